"""mPLUG-Owl2's modality-adaptive module: per-token text/visual RMSNorm and K/V projection.

Design note: the official MultiwayNetwork gathers the tokens of each modality (nonzero + index_put) for
every LayerNorm and K/V projection of every layer. We never gather: RMSNorm's normalisation is the same
for both modalities, so only the weight differs and is picked per token with `torch.where`; K and V are
computed densely by both projections and selected with `torch.where` on the indicator. That costs two
(small, kv-width) matmuls instead of one, with no data-dependent shapes, so it traces, compiles and runs
on any device. When no visual token is in play (text-only prompts, every decode step) the indicator is
None and only the text weights run. Q, O and the MLP are shared. GQA works (the K/V width is
kv_heads * head_dim), which the official code cannot do.

Parameter names mirror the official `...multiway.{0,1}` (0 = text, 1 = visual) so the key map is a rename.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Owl2Config
from .attention import AttnContext, merge_heads, split_heads
from .layers import RMSNorm, apply_rope, attend


class MultiwayRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.multiway = nn.ModuleList([RMSNorm(dim, eps), RMSNorm(dim, eps)])

    def forward(self, x: Tensor, visual: Tensor | None) -> Tensor:
        """x [B, L, H]; visual [B, L] bool (True = visual token) or None (all text)."""
        if visual is None:
            return self.multiway[0](x)
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        w = torch.where(visual[..., None], self.multiway[1].weight, self.multiway[0].weight)  # [B, L, H]
        return w * h


class MultiwayLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([nn.Linear(d_in, d_out, bias=bias), nn.Linear(d_in, d_out, bias=bias)])

    def forward(self, x: Tensor, visual: Tensor | None) -> Tensor:
        text = self.multiway[0](x)
        if visual is None:
            return text
        return torch.where(visual[..., None], self.multiway[1](x), text)  # dense, no gather


class ModalityAttention(nn.Module):
    """LLaMA attention with shared q/o and modality-adaptive k/v; RoPE; GQA; text-only KVCache."""

    def __init__(self, cfg: Owl2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.heads * d, bias=bias)
        self.k_proj = MultiwayLinear(h, self.kv_heads * d, bias)
        self.v_proj = MultiwayLinear(h, self.kv_heads * d, bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=bias)

    def forward(self, x: Tensor, ctx: AttnContext, visual: Tensor | None) -> Tensor:
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]  # [B, 1, L, D]
        q = apply_rope(split_heads(self.q_proj(x), self.heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(x, visual), self.kv_heads), cos, sin)
        v = split_heads(self.v_proj(x, visual), self.kv_heads)
        if ctx.cache is not None:  # visual rows are ordinary sequence slots of the cache
            ctx.cache.write_text(self.layer_idx, k, v)
            k, v = ctx.cache.text(self.layer_idx, ctx.lq)
        return self.o_proj(merge_heads(attend(q, k, v, ctx.text_mask, ctx.causal)))


