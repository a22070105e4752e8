"""Building blocks shared by every model: RMSNorm, RoPE (and MI-Rope), SwiGLU MLP, the one attention call.

Design note: RoPE tables are computed from explicit position tensors on every call (no buffers, no
max-length table) so text tokens, MI-Rope visual keys (one position per image) and left-padded rows all
go through the same function. Rotation math runs in float32 and is cast back, matching the reference
implementations. All attention in the package goes through `attend`, a thin wrapper over PyTorch SDPA
with native GQA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """LLaMA/Qwen2 MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer positions [...] -> two float32 tensors [..., head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split convention: [f0..f_{D/2}, f0..f_{D/2}]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., D] by cos/sin tables broadcastable to it (e.g. [B, 1, L, D]); math in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """The single attention path: SDPA over q [B,H,Lq,D], k/v [B,Hkv,Lk,D] (GQA when Hkv < H).

    `mask` is boolean (True = may attend), shaped [B or 1, 1, Lq, Lk]. Every query row must see at least
    one key (callers guarantee it) so no NaN can appear. For GQA without the causal flag, the query heads
    sharing a KV head are folded into the query axis ([B, Hkv, rep*Lq, D]) so K/V are never copied per
    query head: with long visual key sequences that copy would dominate the cost.
    """
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    if hkv == h:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    if causal and mask is None:  # causal alignment needs the real query axis; text K/V are short anyway
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rep = h // hkv
    qf = q.reshape(b, hkv, rep * lq, d)  # head h uses KV head h // rep: [B, Hkv, rep*Lq, D]
    if mask is not None:
        mask = mask[:, :, None].expand(mask.shape[0], 1, rep, lq, mask.shape[-1]).reshape(mask.shape[0], 1, rep * lq, -1)
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask).view(b, h, lq, d)
