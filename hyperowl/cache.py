"""The explicit decode cache: text K/V per layer, visual K/V per hyper layer written once at prefill.

Design note: one buffer per decoder layer, [B, kv_heads, Nv + capacity, head_dim]. A hyper layer's buffer
starts with its visual keys/values (after the shared LayerNorm, `v_kv_proj` and MI-Rope), written once at
prefill; text K/V follow from slot Nv on. So a decode step never re-projects or copies the visual
features: the 240728 cross-attention reads the view [:Nv], the 241101 fused attention reads the contiguous
view [:Nv + length]. Non-hyper layers have Nv = 0. All rows share one text length (prompts are
left-padded); `key_valid` marks padding slots, `next_pos` holds each row's next RoPE position, and
`image_pos` the position from which each image is visible (also its MI-Rope position).
The cache holds no module state and can be kept by a caller (the engine) across calls.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # text slots filled (same for every row)
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.nv: list[int] = [0] * num_layers  # visual slots at the front of each layer's buffer
        self.key_valid: Tensor | None = None  # [B, capacity] bool
        self.next_pos: Tensor | None = None  # [B] long
        self.image_pos: Tensor | None = None  # [B, N_max] long, visible-from position, huge = padding
        self.visual_writes = 0  # how many times visual K/V were computed into this cache (tests check 1/layer)

    @property
    def has_visual(self) -> bool:
        return self.image_pos is not None

    # -- bookkeeping done once per forward by the model -------------------------------------------------
    def begin(self, new_valid: Tensor) -> None:
        """Record the validity mask of the Lq tokens about to be written; grows the buffers if needed."""
        b, lq = new_valid.shape
        if self.key_valid is None:
            self.capacity = max(self.capacity, lq)
            self.key_valid = torch.zeros(b, self.capacity, dtype=torch.bool, device=new_valid.device)
            self.next_pos = torch.zeros(b, dtype=torch.long, device=new_valid.device)
        if self.length + lq > self.capacity:
            self._grow(max(self.length + lq, 2 * self.capacity))
        self.key_valid[:, self.length : self.length + lq] = new_valid.bool()

    def commit(self, lq: int, last_pos: Tensor) -> None:
        self.length += lq
        self.next_pos = last_pos + 1

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-2], extra, t.shape[-1])], dim=-2)
        self.k = [None if t is None else pad(t) for t in self.k]
        self.v = [None if t is None else pad(t) for t in self.v]
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_zeros(self.key_valid.shape[0], extra)], 1)
        self.capacity = capacity

    # -- per-layer writes and reads ----------------------------------------------------------------------
    def _alloc(self, i: int, like: Tensor, nv: int) -> None:
        b, h, _, d = like.shape
        shape = (b, h, nv + self.capacity, d)
        # empty, not zeros: every slot is written before it is read (reads stop at the filled length), and
        # zero-filling a long video's visual K/V is a measurable share of TTFT
        self.k[i] = like.new_empty(shape)
        self.v[i] = like.new_empty(shape)
        self.nv[i] = nv

    def alloc_visual(self, i: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        """Make layer i's buffer with nv = shape[2] visual slots in front; returns the views [B, Hkv, nv, D] for
        the caller to fill (once, at prefill)."""
        if self.length or self.k[i] is not None:
            raise RuntimeError("visual K/V can only be written at prefill, into an empty cache")
        b, h, nv, d = shape
        self._alloc(i, torch.empty(b, h, 0, d, dtype=dtype, device=device), nv)
        self.visual_writes += 1
        return self.visual(i)

    def visual(self, i: int) -> tuple[Tensor, Tensor]:
        nv = self.nv[i]
        return self.k[i][:, :, :nv], self.v[i][:, :, :nv]

    def write_text(self, i: int, k: Tensor, v: Tensor) -> None:
        if self.k[i] is None:
            self._alloc(i, k, 0)
        s = self.nv[i] + self.length
        self.k[i][:, :, s : s + k.shape[2]] = k
        self.v[i][:, :, s : s + k.shape[2]] = v

    def text(self, i: int, lq: int) -> tuple[Tensor, Tensor]:
        """Text K/V of all filled slots including the lq just written."""
        s, e = self.nv[i], self.nv[i] + self.length + lq
        return self.k[i][:, :, s:e], self.v[i][:, :, s:e]

    def visual_and_text(self, i: int, lq: int) -> tuple[Tensor, Tensor]:
        """[visual ; text] K/V as one contiguous view (the 241101 fused attention's keys)."""
        e = self.nv[i] + self.length + lq
        return self.k[i][:, :, :e], self.v[i][:, :, :e]

    def reorder(self, rows: Tensor) -> None:
        """Keep only `rows` of the batch (e.g. drop finished requests)."""
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]
        for name in ("key_valid", "next_pos", "image_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[rows])
