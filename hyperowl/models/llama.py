"""The LLaMA decoder of mPLUG-Owl2, with the modality-adaptive module in every layer.

Design note: a layer is pre-norm attention + pre-norm SwiGLU MLP, where both norms and the K/V
projections are two-way (text / visual, see modality_adaptive.py) and Q, O, MLP are shared. The per-token
modality indicator is one [B, L] bool tensor handed to every layer (None = all text). The attention
context (RoPE tables, mask, cache) is built once per forward by `make_owl2_context`, reusing the Owl3
mask builder, so padding and caching behave exactly like the Owl3 text path.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..cache import KVCache
from ..config import Owl2Config
from .attention import AttnContext, build_text_mask
from .layers import RMSNorm, SwiGLU, rope_cos_sin
from .modality_adaptive import ModalityAttention, MultiwayRMSNorm


def make_owl2_context(cfg: Owl2Config, positions: Tensor, key_valid: Tensor, past: int, cache: KVCache | None) -> AttnContext:
    """positions [B, Lq]; key_valid [B, past+Lq] bool. A mask only when needed (padding or a cached prefix)."""
    lq = positions.shape[1]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    if not bool(key_valid.all()) or (lq > 1 and past > 0):
        text_mask, causal = build_text_mask(key_valid, past, lq), False
    else:  # one unpadded query sees everything; an unpadded fresh prefill is plain causal
        text_mask, causal = None, lq > 1
    return AttnContext(cos=cos, sin=sin, text_mask=text_mask, causal=causal, cache=cache, lq=lq)


class Owl2DecoderLayer(nn.Module):
    def __init__(self, cfg: Owl2Config, idx: int) -> None:
        super().__init__()
        self.input_layernorm = MultiwayRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ModalityAttention(cfg, idx)
        self.post_attention_layernorm = MultiwayRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, ctx: AttnContext, visual: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x, visual), ctx, visual)
        return x + self.mlp(self.post_attention_layernorm(x, visual))


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: Owl2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Owl2DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.activation_checkpointing = False

    def forward(self, x: Tensor, ctx: AttnContext, visual: Tensor | None,
                hidden_states: list[Tensor] | None = None) -> Tensor:
        """x: input rows [B, L, H] (token embeddings and visual rows) -> final-normed hidden states."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.activation_checkpointing and self.training and ctx.cache is None:
                x = checkpoint(layer, x, ctx, visual, use_reentrant=False)
            else:
                x = layer(x, ctx, visual)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x
