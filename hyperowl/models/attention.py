"""Qwen2 self-attention and the per-forward attention context shared by every layer.

Design note: everything a layer needs that does not depend on its weights (RoPE tables, the text mask,
the cache, the visual inputs and the query segmentation by visible-image count) is computed once per
forward into an `AttnContext` and handed to every layer. Layers own no state between calls.

Masks: a text query may attend cached/new text keys that are causal and not padding. Padding queries
additionally see themselves so no softmax row is empty (their outputs are never used). When there is no
padding the mask is dropped entirely (decode) or replaced by SDPA's causal flag (prefill).

Visibility of images: image j of a row is visible to a text token at position p iff p >= image_pos[j],
where image_pos is the placeholder's position + 1 (240728: images strictly before the token) or the
placeholder's position (241101: the placeholder sees its own image). Positions, not raw indices, are used,
so a left-padded row gives the same result as the same row alone. Since visible images are always a
prefix of the row's image list, queries are grouped into *segments* with the same visible count k; each
segment attends the first k*T visual keys with no mask at all (see hyper_attention.py). Runs of small
segments (a handful of queries each, like one placeholder per image) are merged into one call whose mask
covers only those few queries (`build_segments`), so the visual K/V are not re-read once per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..config import Owl3Config
from .layers import apply_rope, attend, rope_cos_sin

BIG_POS = 1 << 40  # image_pos of padding images: never visible


@dataclass
class Segment:
    """Queries that see at most the first `k` images (at least `lo`). idx [R, n] indexes queries (Lq = dummy
    slot) of the rows `rows`; idx None = all queries of every row (then all see exactly k)."""

    k: int
    idx: Tensor | None
    lo: int  # smallest visible count among the queries (== k unless small segments were merged)
    # The batch rows this segment runs on: the range from the first to the last row with one of its queries
    # (a slice, so the rows' K/V, masks and queries are views, not copies); None = every row.
    rows: slice | None = None

    def of_rows(self, x: Tensor) -> Tensor:
        """x's entries (dim 0: batch) for this segment's rows; a view."""
        return x if self.rows is None else x[self.rows]


@dataclass
class AttnContext:
    cos: Tensor  # [B, Lq, D] text RoPE
    sin: Tensor
    text_mask: Tensor | None  # [B, 1, Lq, Lk] bool, or None
    causal: bool  # use SDPA's causal flag (no padding, fresh prefill)
    cache: KVCache | None
    lq: int
    # visual side (None when no image is in play)
    visual_embeds: Tensor | None = None  # [N, T, H] new image features to project, rows' images packed (prefill)
    visual_slots: Tensor | None = None  # [N] row * N_max + slot of each image; None = every slot, in order
    visual_cos: Tensor | None = None  # [B, N_new, D] MI-Rope tables of the images in visual_embeds
    visual_sin: Tensor | None = None
    counts: Tensor | None = None  # [B, Lq] images visible to each query
    segments: list[Segment] = field(default_factory=list)

    @property
    def has_visual(self) -> bool:
        return self.counts is not None


def build_text_mask(key_valid: Tensor, past: int, lq: int) -> Tensor:
    """[B, 1, Lq, past+Lq] bool: causal over slots, padding keys hidden, each query sees its own slot."""
    lk = past + lq
    q_slot = torch.arange(past, lk, device=key_valid.device)[:, None]
    k_slot = torch.arange(lk, device=key_valid.device)[None, :]
    causal = k_slot <= q_slot  # [Lq, Lk]
    mask = causal[None] & key_valid[:, None, :lk]
    mask |= (k_slot == q_slot)[None]
    return mask[:, None]


# Queries of small segments are merged into groups of at most this many per row (see build_segments).
GROUP_QUERIES = 8


def build_segments(counts: Tensor, skip_zero: bool, group: int | None = None) -> list[Segment]:
    """Group queries by visible-image count. counts [B, Lq] -> Segments in ascending count order.

    A segment with one distinct count attends its first k*T visual keys with no mask. Runs of *small*
    segments (at most `group` queries per row in all, e.g. the image placeholders of an interleaved prompt,
    one per count) are merged into one segment over the largest count, with a [queries x k*T] mask for the
    queries that see fewer images: without merging, N placeholders cost N attention calls that re-read a
    growing prefix of the visual K/V (O(N^2) memory traffic, the dominant prefill cost beyond the vision
    tower at a few hundred images); merged, each group reads it once.
    """
    group = GROUP_QUERIES if group is None else group
    b, lq = counts.shape
    values = torch.unique(counts).tolist()
    if skip_zero:
        values = [k for k in values if k != 0]
    if not values:
        return []
    if len(values) == 1 and bool((counts == values[0]).all()):
        return [Segment(values[0], None, values[0])]
    order = torch.argsort(counts, dim=1, stable=True)
    ordered = counts.gather(1, order)
    per_value = (ordered[:, :, None] == torch.tensor(values, device=counts.device)).sum(1)  # [B, V] queries per count
    runs, cur, cur_n, cur_small = [], [], None, False  # runs of value indices; cur_n [B] queries per row in the run
    for j in range(len(values)):
        n_j = per_value[:, j]
        small = int(n_j.max()) <= group
        if cur and small and cur_small and int((cur_n + n_j).max()) <= group:
            cur.append(j)
            cur_n = cur_n + n_j
            continue
        if cur:
            runs.append(cur)
        cur, cur_n, cur_small = [j], n_j, small
    runs.append(cur)
    segments = []
    for run in runs:
        lo, hi = values[run[0]], values[run[-1]]
        start = (ordered < lo).sum(1)  # [B]
        n = per_value[:, run].sum(1)  # [B]
        ar = torch.arange(int(n.max()), device=counts.device)
        idx = order.gather(1, (start[:, None] + ar).clamp(max=lq - 1))  # [B, n_max]
        idx = torch.where(ar[None] < n[:, None], idx, lq)  # rows with fewer queries point at the dummy slot
        # Rows outside the first..last row with a query here would only run dummy queries over k*T keys (as
        # much memory traffic as a real row): a batch with one long row would pay B times for its segments.
        has = (n > 0).nonzero().flatten().tolist()
        rows = None if (has[0], has[-1]) == (0, b - 1) else slice(has[0], has[-1] + 1)
        segments.append(Segment(hi, idx if rows is None else idx[rows], lo, rows))
    return segments


def segment_visual_mask(seg: Segment, counts: Tensor, tokens_per_image: int) -> Tensor | None:
    """[R, 1, n, k*T] bool (R: the segment's rows): which of the segment's first k*T visual keys each of its
    queries sees; None when all do (one count). The dummy slot (padded idx entries) sees everything."""
    if seg.lo == seg.k:
        return None
    counts = seg.of_rows(counts)
    c = torch.cat([counts, counts.new_full((counts.shape[0], 1), seg.k)], 1).gather(1, seg.idx)  # [R, n]
    keys = torch.arange(seg.k * tokens_per_image, device=counts.device)
    return (keys[None, None] < (c * tokens_per_image)[:, :, None])[:, None]


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, l, _ = x.shape
    return x.view(b, l, heads, -1).transpose(1, 2)  # [B, heads, L, D]


def merge_heads(x: Tensor) -> Tensor:
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)  # [B, L, heads*D]


class Attention(nn.Module):
    """Qwen2 attention: biased q/k/v, unbiased o, RoPE, GQA."""

    def __init__(self, cfg: Owl3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def project_text(self, h: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,H,Lq,D] and this step's k/v [B,Hkv,Lq,D], RoPE applied to q and k."""
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]
        q = apply_rope(split_heads(self.q_proj(h), self.heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(h), self.kv_heads), cos, sin)
        return q, k, split_heads(self.v_proj(h), self.kv_heads)

    def text_kv(self, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor]:
        """Write this step's text K/V to the cache (if any) and return all text K/V to attend."""
        if ctx.cache is None:
            return k, v
        ctx.cache.write_text(self.layer_idx, k, v)
        return ctx.cache.text(self.layer_idx, ctx.lq)

    def forward(self, h: Tensor, ctx: AttnContext, norm: nn.Module | None = None) -> Tensor:
        q, k, v = self.project_text(h, ctx)
        k, v = self.text_kv(k, v, ctx)
        return self.o_proj(merge_heads(attend(q, k, v, ctx.text_mask, ctx.causal)))


def make_context(
    cfg: Owl3Config,
    positions: Tensor,
    key_valid: Tensor,
    past: int,
    cache: KVCache | None,
    image_pos: Tensor | None,
    visual_embeds: Tensor | None,
    visual_slots: Tensor | None = None,
    visual_pos: Tensor | None = None,
) -> AttnContext:
    """positions [B, Lq]; key_valid [B, past+Lq] bool; image_pos [B, N_max] visible-from positions;
    visual_embeds [N, T, H] with visual_slots [N] (see AttnContext); visual_pos [B, N_new]: the positions of
    the images in visual_embeds when they are appended to a kept cache (image_pos then holds old and new
    images), None: visual_embeds are image_pos's images."""
    lq = positions.shape[1]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    padded = not bool(key_valid.all())
    fused = cfg.variant == "241101" and image_pos is not None
    if padded or (lq > 1 and (past > 0 or fused)):  # fused segments need the mask rows explicitly
        text_mask, causal = build_text_mask(key_valid, past, lq), False
    else:  # a single unpadded query sees everything; an unpadded fresh prefill is plain causal
        text_mask, causal = None, lq > 1
    ctx = AttnContext(cos=cos, sin=sin, text_mask=text_mask, causal=causal, cache=cache, lq=lq)
    if image_pos is None:
        return ctx
    ctx.visual_embeds, ctx.visual_slots = visual_embeds, visual_slots
    if visual_embeds is not None:
        vpos = image_pos if visual_pos is None else visual_pos
        vpos = vpos.clamp(max=1 << 30)  # padding images: any finite position, never attended
        ctx.visual_cos, ctx.visual_sin = rope_cos_sin(vpos, cfg.head_dim, cfg.rope_theta)
    ctx.counts = (image_pos[:, None, :] <= positions[:, :, None]).sum(-1)  # [B, Lq]
    ctx.segments = build_segments(ctx.counts, skip_zero=cfg.variant == "240728")
    return ctx
