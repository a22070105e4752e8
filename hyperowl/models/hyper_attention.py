"""The mPLUG-Owl3 hyper-attention layer: text queries attend text and the images placed before them.

Design note. The text hidden state is the query for both self-attention over text and cross-attention over
visual features. Visual K/V come from `v_kv_proj` applied to the visual features after this layer's own
input LayerNorm (shared with text); output channels are laid out (kv_head, {K,V}, head_dim). Every key of
image j carries MI-Rope: the rotary position from which the image is visible (see attention.py). Values
are not rotated.

- 240728: separate softmaxes. C = causal self-attention context, X = cross-attention context, and for
  tokens that see at least one image the output is C*(1-g) + X*g with g = sigmoid(gate_proj(C)) per head
  (a Linear head_dim -> head_dim shared by heads); tokens that see none keep C.
- 241101: one softmax over [visual ; text] keys, no gate.

Visual K/V are computed once (at prefill, or when images are appended to a kept cache) and only read
afterwards. Queries are grouped into segments by how many images they see (a prefix of the image list), so
each SDPA call attends exactly the visible visual keys with no [text x visual] mask; a decode step is a
single segment.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..config import Owl3Config
from .attention import AttnContext, Attention, Segment, merge_heads, segment_visual_mask
from .layers import apply_rope, attend


# Image tokens per chunk when projecting visual K/V (see visual_kv): ~14 MB of float32 features at width 896.
VISUAL_CHUNK_TOKENS = 4096


class HyperAttention(Attention):
    def __init__(self, cfg: Owl3Config, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.variant = cfg.variant
        self.tokens_per_image = cfg.vision.tokens_per_image
        self.v_kv_proj = nn.Linear(cfg.hidden_size, 2 * self.kv_heads * self.head_dim, bias=True)
        if self.variant == "240728":
            self.gate_proj = nn.Linear(self.head_dim, self.head_dim, bias=True)

    def visual_kv(self, ctx: AttnContext, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """Visual K/V [B, Hkv, N_max*T, D]: projected (and cached) at prefill, read from the cache later.

        Only the images given are projected (ctx.visual_embeds is [N, T, H], the rows' images packed), in
        chunks of whole images written straight into their slots of the output (the cache's buffer when there
        is one): padding slots of rows with fewer images cost no LayerNorm or projection (they are zeros,
        seen by no real query), and the temporaries stay a few MB whatever the number of images.
        """
        if ctx.visual_embeds is None:
            return ctx.cache.visual(self.layer_idx)
        feats = ctx.visual_embeds
        n, t, _ = feats.shape
        b, n_max = ctx.visual_cos.shape[:2]
        shape = (b, self.kv_heads, n_max * t, self.head_dim)
        if ctx.cache is not None:  # the new images' slots (after any images the cache already holds)
            k, v = ctx.cache.alloc_visual(self.layer_idx, shape, feats.dtype, feats.device)
        else:
            k, v = feats.new_empty(shape), feats.new_empty(shape)
        slots = ctx.visual_slots  # [N] row * N_max + slot of each image; None: all B * N_max slots, in order
        cos, sin = ctx.visual_cos.flatten(0, 1), ctx.visual_sin.flatten(0, 1)  # [B*N_max, D]
        if slots is not None:
            k.zero_()  # padding slots: finite (a dummy query may read them), never seen by real ones
            v.zero_()
            cos, sin = cos[slots], sin[slots]  # [N, D]
        k5 = k.unflatten(2, (n_max, t)).transpose(1, 2)  # [B, N_max, Hkv, T, D] views of the outputs
        v5 = v.unflatten(2, (n_max, t)).transpose(1, 2)
        step = max(1, VISUAL_CHUNK_TOKENS // t)  # images per chunk
        for s in range(0, n, step):
            e = min(n, s + step)
            x = norm(feats[s:e])  # the layer's own input LayerNorm ("shared layernorm")
            kv = self.v_kv_proj(x).view(e - s, t, self.kv_heads, 2, self.head_dim)
            kc = apply_rope(kv[..., 0, :].transpose(1, 2), cos[s:e, None, None], sin[s:e, None, None])  # [n, Hkv, T, D]
            flat = torch.arange(s, e, device=feats.device) if slots is None else slots[s:e]
            row, col = flat // n_max, flat % n_max
            k5[row, col] = kc  # one MI-Rope position per image
            v5[row, col] = kv[..., 1, :].transpose(1, 2)
        return (k, v) if ctx.cache is None else ctx.cache.visual(self.layer_idx)

    def forward(self, h: Tensor, ctx: AttnContext, norm: nn.Module | None = None) -> Tensor:
        if not ctx.has_visual:
            return super().forward(h, ctx)
        q, k, v = self.project_text(h, ctx)
        vk, vv = self.visual_kv(ctx, norm)  # before the text write: visual slots come first in the cache
        k, v = self.text_kv(k, v, ctx)
        t = self.tokens_per_image

        if self.variant == "240728":
            c = attend(q, k, v, ctx.text_mask, ctx.causal)
            if not ctx.segments:  # no query sees an image yet
                return self.o_proj(merge_heads(c))
            x = by_segment(q, ctx, lambda seg, qs, idx: attend(qs, seg.of_rows(vk)[:, :, : seg.k * t],
                                                              seg.of_rows(vv)[:, :, : seg.k * t],
                                                              segment_visual_mask(seg, ctx.counts, t)))
            g = torch.sigmoid(self.gate_proj(c))
            sees_image = (ctx.counts > 0)[:, None, :, None]
            return self.o_proj(merge_heads(torch.where(sees_image, c * (1 - g) + x * g, c)))

        def fused(seg: Segment, qs: Tensor, idx: Tensor | None) -> Tensor:
            kt, gap = seg.k * t, 0
            if ctx.cache is not None and kt == vk.shape[2]:  # all images: the cache is already [visual ; text]
                keys, values, gap = ctx.cache.visual_and_text(self.layer_idx, ctx.lq)  # gap: spare slots, masked
                keys, values = seg.of_rows(keys), seg.of_rows(values)
            else:
                keys = torch.cat([seg.of_rows(vk)[:, :, :kt], seg.of_rows(k)], 2)
                values = torch.cat([seg.of_rows(vv)[:, :, :kt], seg.of_rows(v)], 2)
            vmask = segment_visual_mask(seg, ctx.counts, t)  # None: every query sees all kt visual keys
            if ctx.text_mask is None and vmask is None and not gap:
                return attend(qs, keys, values)
            lt = keys.shape[2] - kt - gap
            if ctx.text_mask is None:
                rows = torch.ones(qs.shape[0], 1, qs.shape[2], lt, dtype=torch.bool, device=qs.device)
            else:
                rows = seg.of_rows(ctx.text_mask)
                if idx is not None:  # this segment's query rows, the dummy slot seeing everything
                    rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1, 1, rows.shape[-1])], 2)
                    rows = rows.gather(2, idx[:, None, :, None].expand(-1, 1, -1, rows.shape[-1]))
            if vmask is None:
                vmask = rows.new_ones(*rows.shape[:-1], kt)
            parts = [vmask.expand(rows.shape[0], -1, -1, -1), rows]
            if gap:
                parts.insert(1, rows.new_zeros(*rows.shape[:-1], gap))
            return attend(qs, keys, values, torch.cat(parts, -1))

        return self.o_proj(merge_heads(by_segment(q, ctx, fused)))


def by_segment(q: Tensor, ctx: AttnContext, fn: Callable[[Segment, Tensor, Tensor | None], Tensor]) -> Tensor:
    """Run fn(segment, queries_of_segment, idx) per segment and put the results back in query order.

    Queries not in any segment get zeros. Padded entries of idx point at a dummy slot Lq. fn sees only the
    segment's rows (`seg.rows`; its K/V and masks via `seg.of_rows`).
    """
    segs = ctx.segments
    if len(segs) == 1 and segs[0].idx is None:
        return fn(segs[0], q, None)
    b, h, lq, d = q.shape
    q_ext = torch.cat([q, q.new_zeros(b, h, 1, d)], 2)
    out = q.new_zeros(b, h, lq + 1, d)
    for seg in segs:
        gi = seg.idx[:, None, :, None].expand(-1, h, -1, d)  # [R, H, n, D]
        res = seg.of_rows(out).scatter(2, gi, fn(seg, seg.of_rows(q_ext).gather(2, gi), seg.idx))
        out = res if seg.rows is None else out.slice_scatter(res, 0, seg.rows.start, seg.rows.stop)
    return out[:, :, :lq]
