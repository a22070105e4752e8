"""The Qwen2 decoder stack with hyper-attention layers placed by config, in one visible loop.

Design note: a decoder layer is pre-norm attention + pre-norm SwiGLU MLP. Which layers are hyper layers
is decided in `Qwen2Decoder.__init__` from `cfg.hyper_layers` (1-based, as in the official config). The
layer passes its own `input_layernorm` to the attention so a hyper layer can normalise visual features
with the same weights. With no image in play every layer is exactly Qwen2.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import Owl3Config
from .attention import Attention, AttnContext
from .hyper_attention import HyperAttention
from .layers import RMSNorm, SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Owl3Config, idx: int, hyper: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (HyperAttention if hyper else Attention)(cfg, idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, self.input_layernorm)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    def __init__(self, cfg: Owl3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, hyper=cfg.is_hyper(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.activation_checkpointing = False  # training switch: recompute each layer in backward

    def forward(self, x: Tensor, ctx: AttnContext, hidden_states: list[Tensor] | None = None) -> Tensor:
        """x: token embeddings [B, Lq, H] -> final-normed hidden states. Appends HF-style hidden states."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.activation_checkpointing and self.training and ctx.cache is None:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x
