"""Prompt + pixel preprocessing for mPLUG-Owl2.

Design note
-----------
Pixels: the official pipeline is a `CLIPImageProcessor` (shortest edge -> `size` with PIL bicubic, center
crop `size` x `size`, /255, CLIP mean/std). Three entry paths exist, all reproduced bit-exactly on uint8
pixels (then normalised in float32 as (u8/255 - mean)/std):
  * "resize" (the official README, "for best performance"): PIL-resize to a max-edge square first;
  * "pad" (`image_aspect_ratio='pad'`): paste on a square canvas of the mean colour (int(mean*255));
  * "crop" (plain CLIP processor): shortest-edge resize + center crop.

Prompt: the `mplug_owl2` conversation (TWO_NO_SYS): `USER: {text} ASSISTANT: {answer}</s>USER: ...
ASSISTANT:`; a system message is accepted but not emitted (the official template never emits it).
`<|image|>` placeholders stay where the user put them (the CLI puts them in front of the message, as the
official CLI does). Videos become one image placeholder per sampled frame.

Tokenisation follows the official `tokenizer_image_token`: each chunk between placeholders is encoded
separately with the tokenizer's special tokens; if the first chunk starts with BOS, the first token of
*every* chunk is dropped (the BOS is kept once). Each placeholder becomes one token whose id is the
tokenizer's `<|image|>` id if it has one, else the unk/pad id; the model ignores that id and reads only
`image_positions`. The output is the same `Plan` as the Owl3 processor's (plan.py), so the encoder, the
engine and the pipeline work unchanged.

Training (`training_example`): the whole conversation is rendered without a generation prompt and
tokenised exactly as above; labels keep the tokens whose characters fall in an answer span
(` {answer}</s>` after each `ASSISTANT:`), found from the tokenizer's offsets. So the tokens before each
answer are the inference prompt for that turn and the trained answer ends with the stop token `</s>`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from hyperowl.errors import InputError
from hyperowl.processing.chat import IMAGE_TOKEN, normalize_messages
from hyperowl.processing.images import images_to_tensor
from hyperowl.processing.plan import MediaItem, PlannerBase
from hyperowl.processing.processor import load_tokenizer

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("resize", "pad", "crop")
EOS_TOKEN = "</s>"


def clip_u8(img: Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor geometry: shortest edge -> size (PIL bicubic), center crop -> uint8 [3, size, size]."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(img, dtype=np.uint8)
    if top < 0 or left < 0:  # cannot happen after the shortest-edge resize; kept as a guard
        raise InputError(f"image of size {img.size}: too small to crop to {size}")
    return torch.from_numpy(arr[top : top + size, left : left + size].copy()).permute(2, 0, 1).contiguous()


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def preprocess_u8(img: Image.Image, size: int, mode: str = "resize") -> torch.Tensor:
    """One image -> uint8 [3, size, size] through the chosen official path."""
    if mode not in ASPECT_MODES:
        raise InputError(f"image_aspect_ratio {mode!r}: must be one of {', '.join(ASPECT_MODES)}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "resize":
        edge = max(img.size)
        img = img.resize((edge, edge), Image.Resampling.BICUBIC)
    elif mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in CLIP_MEAN))
    return clip_u8(img, size)


def normalize_u8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 (u8/255 - mean)/std per channel."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (u8.to(torch.float32) / 255.0 - mean) / std


def preprocess(img: Image.Image, size: int, mode: str = "resize") -> torch.Tensor:
    return normalize_u8(preprocess_u8(img, size, mode))


def render_owl2(messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
    """The official `mplug_owl2` conversation text (system messages are dropped, as the template does)."""
    pairs = normalize_messages(messages)
    if pairs and pairs[0][0] == "system":
        logger.debug("mPLUG-Owl2's prompt format has no system turn; the system message is not used")
        pairs = pairs[1:]
    open_assistant = bool(pairs) and pairs[-1] == ("assistant", "")
    if open_assistant:
        pairs = pairs[:-1]
    out = []
    for role, content in pairs:
        out.append(f"USER: {content} " if role == "user" else f"ASSISTANT: {content}{EOS_TOKEN}")
    if add_generation_prompt or open_assistant:
        out.append("ASSISTANT:")
    return "".join(out)


def tokenizer_image_token(prompt: str, encode: Callable[[str], list[int]], bos_id: Optional[int],
                          image_id: int) -> tuple[list[int], list[int]]:
    """The official chunk-wise tokenisation -> (ids, index of each image placeholder)."""
    chunks = [encode(c) if c else [] for c in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and bos_id is not None and chunks[0][0] == bos_id else 0
    ids: list[int] = [chunks[0][0]] if offset else []
    positions: list[int] = []
    for k, chunk in enumerate(chunks):
        if k > 0:
            positions.append(len(ids))
            ids.append(image_id)
        ids.extend(chunk[offset:])
    return ids, positions


def owl2_segments(messages: Sequence[Any]) -> list[tuple[str, bool]]:
    """`render_owl2(messages, add_generation_prompt=False)` split into (text, trainable) pieces: each
    assistant turn is `ASSISTANT:` (context, the end of the inference prompt) + ` {answer}</s>` (trained)."""
    pairs = normalize_messages(messages)
    if pairs and pairs[0][0] == "system":
        pairs = pairs[1:]
    segs: list[tuple[str, bool]] = []
    for role, content in pairs:
        if role == "user":
            segs.append((f"USER: {content} ", False))
        else:
            segs += [("ASSISTANT:", False), (f" {content}{EOS_TOKEN}", True)]
    return segs


def tokenizer_image_token_offsets(prompt: str, tokenizer: Tokenizer, bos_id: Optional[int],
                                  image_id: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """`tokenizer_image_token` (same ids, same BOS rule) that also returns each token's character span in
    `prompt` ((0, 0) for BOS, the placeholder's own span for an image)."""
    chunks, starts, at = [], [], 0
    for c in prompt.split(IMAGE_TOKEN):
        chunks.append(c)
        starts.append(at)
        at += len(c) + len(IMAGE_TOKEN)
    encs = [tokenizer.encode(c, add_special_tokens=True) if c else None for c in chunks]
    first = encs[0].ids if encs and encs[0] is not None else []
    drop = 1 if first and bos_id is not None and first[0] == bos_id else 0
    ids: list[int] = [first[0]] if drop else []
    offsets: list[tuple[int, int]] = [(0, 0)] if drop else []
    positions: list[int] = []
    for k, (enc, start) in enumerate(zip(encs, starts)):
        if k > 0:
            positions.append(len(ids))
            ids.append(image_id)
            offsets.append((start - len(IMAGE_TOKEN), start))
        if enc is None:
            continue
        for tid, (s, e), special in list(zip(enc.ids, enc.offsets, enc.special_tokens_mask))[drop:]:
            ids.append(tid)
            # post-processor tokens (a BOS added by a template) have no characters
            offsets.append((start + s, start + e) if not (special and s == e) else (0, 0))
    return ids, positions, offsets


class Owl2Processor(PlannerBase):
    """Messages + images (+ videos as frames) -> a `Plan` for mPLUG-Owl2 (same interface as Owl3Processor)."""

    cut = False  # Owl2 never cuts images into crops

    def __init__(self, tokenizer: Tokenizer, image_size: int = 448, image_aspect_ratio: str = "resize") -> None:
        if image_aspect_ratio not in ASPECT_MODES:
            raise InputError(f"image_aspect_ratio {image_aspect_ratio!r}: must be one of {', '.join(ASPECT_MODES)}")
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.aspect = image_aspect_ratio
        self.bos_token_id = tokenizer.token_to_id("<s>")
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            image_id = tokenizer.token_to_id("<unk>") or 0
        self.image_token_id: int = image_id  # stop ids are the family table's (families.py), not the processor's

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]", image_size: int = 448,
                 image_aspect_ratio: str = "resize") -> "Owl2Processor":
        return cls(load_tokenizer(path), image_size=image_size, image_aspect_ratio=image_aspect_ratio)

    @property
    def recipe(self) -> str:
        return f"owl2/{self.image_size}/{self.aspect}"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def _image_item(self, item: MediaItem, cut: bool) -> str:
        return IMAGE_TOKEN  # one placeholder, one image tensor (`cut` has no effect for Owl2)

    def _video_text(self, n_frames: int) -> str:
        return IMAGE_TOKEN * n_frames

    def _render_and_tokenize(self, messages: list[dict[str, str]], system: Optional[str],
                             add_generation_prompt: bool, answer_ids: Optional[Mapping[int, Sequence[int]]] = None
                             ) -> tuple[list[int], list[int], str]:
        # `answer_ids` are not used: this template cannot be cut around an answer without changing its
        # tokens (plan.py's note on exact answer ids), so the answers' text is tokenized as before.
        prompt = render_owl2(messages, add_generation_prompt=add_generation_prompt)  # `system` is not emitted
        ids, positions = tokenizer_image_token(prompt, self._encode, self.bos_token_id, self.image_token_id)
        return ids, positions, prompt

    def _training_ids(self, messages: list[dict[str, str]], system: Optional[str]
                      ) -> tuple[list[int], list[int], list[int], str]:
        """Labels: the token ids of each assistant answer and its `</s>`, -100 elsewhere (user turns,
        `ASSISTANT:` headers, BOS, image placeholders).

        The ids are exactly `tokenizer_image_token` of the full conversation text (`render_owl2` without a
        generation prompt), i.e. the inference tokenisation; which tokens are answers is read from the
        tokenizer's character offsets against the answer spans (`owl2_segments`), not from re-tokenising
        pieces, so a SentencePiece tokenizer's prefix-space handling cannot shift the mask.
        """
        segments = owl2_segments(messages)
        text = "".join(t for t, _ in segments)
        spans, at = [], 0
        for seg, trainable in segments:
            if trainable:
                spans.append((at, at + len(seg)))
            at += len(seg)
        ids, positions, offsets = tokenizer_image_token_offsets(text, self.tokenizer, self.bos_token_id,
                                                                self.image_token_id)
        labels = [-100] * len(ids)
        for j, (s, e) in enumerate(offsets):
            if e > s and any(s < b and e > a for a, b in spans):
                labels[j] = ids[j]
        for p in positions:  # an image inside an answer is input, never a target
            labels[p] = -100
        if labels:
            labels[0] = -100  # nothing predicts the first token
        return ids, positions, labels, text

    def image_pixels(self, item: MediaItem) -> torch.Tensor:
        return preprocess(item.image, self.image_size, self.aspect)[None]

    def frame_pixels(self, frames: Iterable[Image.Image], count: int) -> torch.Tensor:
        return images_to_tensor(frames, self.image_size, count, lambda im, size: preprocess(im, size, self.aspect))
