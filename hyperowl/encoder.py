"""The encoding stage: planned media items -> pixels -> vision features, through one content-hash cache.

Design note
-----------
This is the only inference-time caller of the vision tower (`model.encode_images`). A processor plans
(`Plan.items`, each with a content key); the encoder turns each item into features [count, T, H]:
  1. the feature cache (`FeatureCache`, keyed by the item's content hash + pixel recipe + the model's
     dtype) is asked first, so a repeated image, the images of a multi-turn chat and a video asked about
     twice are encoded once;
  2. a miss is decoded and preprocessed by the processor (`processor.item_pixels`: the family's pixel
     recipe; video files through PyAV);
  3. misses go through the tower: all images of a batch in one chunked call, a video file as it decodes,
     `chunk` frames at a time (bounded pixel memory; on an accelerator the next chunk decodes in a thread
     while the tower encodes this one, processing/overlap.py; on a CPU the two would share the cores).
Two entry styles. `encode(plan)` does it all at once (chat, eval). A server splits it across threads:
`lookup(plan)` (cache + decode + preprocess: no model, any thread) then `finish([...])` (the tower, on
the model's thread, one call for a whole batch) or `finish_steps(...)` (the same in bounded steps, so a
continuous-batching server decodes its running answers between the steps of a 400-image prompt). The
engine receives features only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .feature_cache import CachedMedia, FeatureCache
from .processing.overlap import chunked, encode_overlapped
from .processing.plan import MediaItem, Plan

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One media item on its way to features: found in the cache (`embeds`), or `pixels` to encode."""

    item: MediaItem
    key: str
    embeds: Optional[Tensor] = None
    pixels: Optional[Tensor] = None
    hit: bool = False  # came from the cache (usage reporting)


class Encoder:
    """Media items -> features for one model and its processor, with an optional shared feature cache."""

    def __init__(self, model: Any, processor: Any, cache: Optional[FeatureCache] = None, *, chunk: int = 16,
                 overlap: Optional[bool] = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: must be at least 1 frame")
        self.model, self.processor = model, processor
        self.cache = cache if cache is not None else FeatureCache(0)
        self.chunk = chunk
        self.overlap = overlap  # None: overlap video decoding with the tower on accelerators only

    def _key(self, item: MediaItem) -> str:
        return f"{item.key}:{self.model.dtype}"

    def _tower(self, pixels: Tensor) -> Tensor:
        return encode_pixels(self.model, pixels)

    # -- split style (server): lookup in any thread, finish on the model's thread ---------------------------
    def lookup(self, plan: Plan, decode: bool = True) -> list[Pending]:
        """Each item from the cache, or (decode=True) its pixels made now. No model call."""
        out = []
        for item in plan.items:
            key = self._key(item)
            hit = self.cache.get(key) if self.cache.max_bytes else None
            if hit is not None:
                out.append(Pending(item, key, embeds=hit.embeds, hit=True))
            else:
                out.append(Pending(item, key, pixels=self.processor.item_pixels(item) if decode else None))
        return out

    def finish(self, batch: list[list[Pending]]) -> list[Optional[Tensor]]:
        """Features [N, T, H] per prompt (None without media): every miss of every prompt in one (chunked)
        tower call, stored in the cache."""
        todo = [p for pend in batch for p in pend if p.embeds is None]
        if todo:
            # One item (a long video, say) is encoded as it is: no copy of its pixels, none of its features.
            one = len(todo) == 1
            embeds = self._tower(todo[0].pixels if one else torch.cat([p.pixels for p in todo]))
            for p, e in zip(todo, embeds.split([p.item.count for p in todo])):
                # own storage, not a view of the batch (the cache must not pin the other items' features)
                self._store(p, embeds if one else e.clone())
        return [_join([p.embeds for p in pend]) for pend in batch]

    def finish_steps(self, pend: list[Pending], chunk: int) -> Iterator[int]:
        """`finish([pend])` in steps of at most `chunk` image tensors through the tower (small items share a
        step, a large one is split); yields the image tensors each step encoded, so the caller can run other
        work between steps. When exhausted, every item has its features (stored in the cache); `_join` of
        them is the prompt's features."""
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: must be at least 1 image tensor")
        todo = [p for p in pend if p.embeds is None]
        parts: dict[int, list[Tensor]] = {id(p): [] for p in todo}
        slices = [(p, a, min(a + chunk, p.item.count)) for p in todo for a in range(0, p.item.count, chunk)]
        while slices:
            step, n = [], 0
            while slices and n + slices[0][2] - slices[0][1] <= chunk:  # whole slices, at most `chunk` tensors
                step.append(slices.pop(0))
                n += step[-1][2] - step[-1][1]
            pixels = [p.pixels[a:b] for p, a, b in step]
            embeds = self._tower(pixels[0] if len(pixels) == 1 else torch.cat(pixels))
            for (p, a, b), e in zip(step, embeds.split([b - a for _, a, b in step])):
                parts[id(p)].append(e if len(step) == 1 else e.clone())
                if b == p.item.count:  # the item's last slice: its features are complete
                    got = parts.pop(id(p))
                    self._store(p, got[0] if len(got) == 1 else torch.cat(got))
            yield n

    def _store(self, p: Pending, embeds: Tensor) -> None:
        p.embeds, p.pixels = embeds, None
        self.cache.put(p.key, CachedMedia(embeds, frames=p.item.count if p.item.kind == "video" else 0))

    # -- live video (hyperowl/live.py) -----------------------------------------------------------------------
    def encode_frames(self, pixels: Tensor) -> Tensor:
        """Live frames' pixels [F, 3, S, S] -> features [F, T, H], through the tower in one (chunked) call. No
        feature cache: a live frame is seen once, and hashing each would cost more than it saves."""
        return self._tower(pixels)

    # -- one prompt at a time (chat, eval) ---------------------------------------------------------------------
    def encode(self, plan: Plan, progress: Optional[bool] = None) -> Optional[Tensor]:
        """A plan's features [N, T, H] in placeholder order (None without media). Images: one tower call for
        all misses. Video files: decoded and encoded `chunk` frames at a time."""
        return self.encode_many([plan], progress)[0]

    def encode_many(self, plans: list[Plan], progress: Optional[bool] = None) -> list[Optional[Tensor]]:
        batch = [self.lookup(plan, decode=False) for plan in plans]
        for pend in batch:
            for p in pend:
                if p.embeds is not None:
                    continue
                if p.item.kind == "video" and isinstance(p.item.source, (str, os.PathLike)):
                    self._store(p, self._stream_video(p.item, progress))
                else:
                    p.pixels = self.processor.item_pixels(p.item)
        return self.finish(batch)

    def _stream_video(self, item: MediaItem, progress: Optional[bool]) -> Tensor:
        overlap = self.overlap if self.overlap is not None else self.model.device.type != "cpu"
        frames = self.processor.decode_frames(item, progress)
        chunks = (self.processor.frame_pixels(group, len(group)) for group in chunked(frames, self.chunk))
        return encode_overlapped(chunks, self._tower, threaded=overlap, total=item.count)


def encode_pixels(model: Any, pixels: Tensor) -> Tensor:
    """Pixels [N, 3, S, S] -> features [N, T, H] through the model's tower (chunked inside), without autograd."""
    with torch.no_grad():
        return model.encode_images(pixels)


def _join(parts: list[Tensor]) -> Optional[Tensor]:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)
