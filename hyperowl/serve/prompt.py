"""Chat request + media bytes -> token ids, image positions and per-item visual work (cached or to encode).

Design note: each media part becomes one `<|image|>` / `<|video|>` placeholder at its place in the message
text, and the processor does everything else (cut templates, video frame tokens, ChatML, tokenization), so
the server prompt is exactly the library's prompt. The processor passes each item's pixel tensor to an
`encode` hook in placeholder order (image: rows*cols + 1 crops when cut, else 1; video: one per frame); we
keep them per item, uncopied, so each item can be looked up in / stored into the feature cache on its own.

A cache hit for a *video* skips decoding: the processor is given a view of one zero frame expanded to that
many frames (a video's prompt depends only on its frame count), never materialized. An image is still decoded on a hit,
because its cut grid depends on its size, but it is not re-encoded; the vision tower is the expensive
part. A cached entry is held by reference from here on, so an eviction before the worker runs is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch
from PIL import Image
from torch import Tensor

from ..errors import InputError
from ..processing.chat import IMAGE_TOKEN, VIDEO_TOKEN
from ..processing.images import select_grid
from ..processing.processor import Owl3Processor
from .feature_cache import CachedMedia, FeatureCache
from .media import MediaBlob, decode_image, decode_video
from .protocol import ApiError, ChatRequest, MediaPart, TextPart


@dataclass(frozen=True)
class VisualOptions:
    cut: bool = True
    max_frames: int = 16
    fps: float | None = None


@dataclass
class MediaItem:
    key: Hashable
    tensors: int  # image tensors (crops + global view, or frames) this item contributes
    cached: CachedMedia | None  # embeddings from the cache, or None: `pixels` must be encoded
    pixels: Tensor | None
    frames: int = 0  # videos: sampled frame count (kept in the cache entry)
    hit: bool = False  # came from the cache (for usage reporting; `cached` is filled in after encoding too)

    def __post_init__(self) -> None:
        self.hit = self.cached is not None


@dataclass
class PreparedPrompt:
    input_ids: Tensor  # [L]
    image_positions: Tensor | None  # [N] or None without media
    items: list[MediaItem]
    tokens_per_image: int

    @property
    def image_tensors(self) -> int:
        return sum(i.tensors for i in self.items)

    @property
    def visual_tokens(self) -> int:
        return self.image_tensors * self.tokens_per_image

    @property
    def cached_visual_tokens(self) -> int:
        return sum(i.tensors for i in self.items if i.hit) * self.tokens_per_image


def cache_key(blob: MediaBlob, processor: Owl3Processor, opts: VisualOptions, dtype: torch.dtype) -> Hashable:
    """Everything that changes an item's embeddings: its bytes and the preprocessing (and model dtype)."""
    how = (opts.cut,) if blob.kind == "image" else (opts.max_frames, opts.fps)
    return (blob.kind, blob.digest, processor.variant, processor.image_size, str(dtype)) + how


def _message_text(parts: list[TextPart | MediaPart], index: int) -> str:
    out = []
    for j, p in enumerate(parts):
        if isinstance(p, TextPart):
            if IMAGE_TOKEN in p.text or VIDEO_TOKEN in p.text:
                param = f"messages[{index}].content" + ("" if len(parts) == 1 else f"[{j}]")
                raise ApiError(400, f"{param}: text must not contain {IMAGE_TOKEN} or {VIDEO_TOKEN}; send images as "
                                    "image_url parts and videos as video_url parts", param=param,
                               code="invalid_value")
            out.append(p.text)
        else:
            out.append(IMAGE_TOKEN if p.kind == "image" else VIDEO_TOKEN)
    return "".join(out)


def build_prompt(req: ChatRequest, blobs: list[MediaBlob], processor: Owl3Processor, cache: FeatureCache,
                 opts: VisualOptions, tokens_per_image: int, dtype: torch.dtype) -> PreparedPrompt:
    """Synchronous (decodes media, tokenizes): run it off the event loop."""
    messages = [{"role": m.role, "content": _message_text(m.parts, i)} for i, m in enumerate(req.messages)]
    images: list[Image.Image] = []
    videos: list[Tensor] = []  # pixel values [F, 3, S, S] per video
    items: list[MediaItem] = []
    for blob in blobs:
        key = cache_key(blob, processor, opts, dtype)
        hit = cache.get(key)
        if blob.kind == "image":
            img = decode_image(blob)
            images.append(img)
            if opts.cut:
                rows, cols = select_grid(img.width, img.height, processor.image_size)
                n = rows * cols + 1
            else:
                n = 1
            items.append(MediaItem(key, n, hit, None))
        else:
            if hit is not None:  # only the frame count matters for the prompt: a view of one zero frame
                s = processor.image_size
                px = torch.zeros(1, 3, s, s).expand(hit.frames, -1, -1, -1)
            else:
                px = decode_video(blob, processor, opts.max_frames, opts.fps)
            videos.append(px)
            items.append(MediaItem(key, px.shape[0], hit, None, frames=px.shape[0]))
    # The processor hands each item's pixels to `encode` once, in placeholder order (images and pixel-tensor
    # videos); we keep them per item and give it an empty [n, 0] stand-in, so nothing is concatenated: a
    # cached video's stand-in frames (an expanded view) are never materialized, the others are not copied.
    per_item: list[Tensor] = []

    def keep(px: Tensor) -> Tensor:
        per_item.append(px)
        return px.new_empty(px.shape[0], 0)

    try:
        inputs = processor(messages, images=images, videos=videos, max_frames=opts.max_frames, fps=opts.fps,
                           cut=opts.cut, progress=False, encode=keep)
    except InputError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    if [px.shape[0] for px in per_item] != [i.tensors for i in items]:
        raise RuntimeError(f"internal error: pixel tensors {[px.shape[0] for px in per_item]} for items of "
                           f"{[i.tensors for i in items]}")
    for item, px in zip(items, per_item):
        if item.cached is None:
            item.pixels = px
    return PreparedPrompt(inputs.input_ids, inputs.image_positions if items else None, items, tokens_per_image)


def encode_items(model: Any, cache: FeatureCache, prompts: list[PreparedPrompt]) -> list[Tensor | None]:
    """Image embeddings per prompt ([N, T, H] in placeholder order, or None): the cached items reused, all
    the others of all prompts encoded in one (chunked) vision call, then stored in the cache."""
    todo = [item for p in prompts for item in p.items if item.cached is None]
    if todo:
        # One item (a long video, say) is encoded as it is: no copy of its pixels, none of its embeddings.
        one = len(todo) == 1
        embeds = model.encode_images(todo[0].pixels if one else torch.cat([item.pixels for item in todo]))
        for item, e in zip(todo, embeds.split([item.tensors for item in todo])):
            # own storage, not a view of the batch (the cache must not pin the other items' embeddings)
            item.cached = CachedMedia(embeds if one else e.clone(), frames=item.frames)
            item.pixels = None  # the pixels are no longer needed
            cache.put(item.key, item.cached)
    out: list[Tensor | None] = []
    for p in prompts:
        out.append(torch.cat([item.cached.embeds for item in p.items]) if p.items else None)
    return out
