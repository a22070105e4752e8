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
`image_positions`. The output is the same `ProcessedInputs` as the Owl3 processor, so `collate`, the
engine and `hyperowl.chat` work unchanged.

Training (`training_example`): the whole conversation is rendered without a generation prompt and
tokenised exactly as above; labels keep the tokens whose characters fall in an answer span
(` {answer}</s>` after each `ASSISTANT:`), found from the tokenizer's offsets. So the tokens before each
answer are the inference prompt for that turn and the trained answer ends with the stop token `</s>`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from hyperowl.errors import InputError
from hyperowl.processing.chat import IMAGE_TOKEN, VIDEO_TOKEN, normalize_messages
from hyperowl.processing.images import load_image
from hyperowl.processing.processor import ProcessedInputs, _as_list

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


class Owl2Processor:
    """Messages + images (+ videos as frames) -> `ProcessedInputs` for mPLUG-Owl2."""

    cut = False  # Owl2 never cuts images into crops (kept for interface parity with Owl3Processor)

    def __init__(self, tokenizer: Tokenizer, image_size: int = 448, image_aspect_ratio: str = "resize",
                 eos_token_id: Optional[int] = None) -> None:
        if image_aspect_ratio not in ASPECT_MODES:
            raise InputError(f"image_aspect_ratio {image_aspect_ratio!r}: must be one of {', '.join(ASPECT_MODES)}")
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.aspect = image_aspect_ratio
        self.bos_token_id = tokenizer.token_to_id("<s>")
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            image_id = tokenizer.token_to_id("<unk>") or 0
        self.image_token_id: int = image_id
        eos = tokenizer.token_to_id(EOS_TOKEN)
        stops = [i for i in (eos, eos_token_id) if i is not None]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]", image_size: int = 448, image_aspect_ratio: str = "resize",
                 eos_token_id: Optional[int] = None) -> "Owl2Processor":
        tok_path = Path(path) / "tokenizer.json"
        if not tok_path.is_file():
            raise InputError(f"checkpoint '{path}': tokenizer.json not found; pass a checkpoint directory that contains it")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise InputError(f"tokenizer '{tok_path}': cannot be loaded ({exc})") from None
        return cls(tokenizer, image_size=image_size, image_aspect_ratio=image_aspect_ratio, eos_token_id=eos_token_id)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def __call__(
        self,
        messages: Sequence[Any],
        images: Any = None,
        videos: Any = None,
        max_frames: int = 16,
        fps: Optional[float] = None,
        system: Optional[str] = None,
        cut: Optional[bool] = None,
        add_generation_prompt: bool = True,
        progress: Optional[bool] = None,
    ) -> ProcessedInputs:
        """Same signature as `Owl3Processor.__call__`; `cut` and `system` have no effect for Owl2."""
        new_messages, pixels = self._expand(messages, images, videos, max_frames, fps, progress)
        prompt = render_owl2(new_messages, add_generation_prompt=add_generation_prompt)
        ids, positions = tokenizer_image_token(prompt, self._encode, self.bos_token_id, self.image_token_id)
        from hyperowl.processing.processor import Owl3Processor

        return Owl3Processor._package(ids, positions, pixels, prompt)

    def training_example(self, messages: Sequence[Any], images: Any = None, videos: Any = None, *,
                         max_frames: int = 16, fps: Optional[float] = None, system: Optional[str] = None,
                         cut: Optional[bool] = None) -> tuple[ProcessedInputs, torch.Tensor]:
        """A whole conversation for training: inputs plus `labels` [L] (the token ids of each assistant answer
        and its `</s>`, -100 elsewhere: user turns, `ASSISTANT:` headers, BOS, image placeholders).

        The ids are exactly `tokenizer_image_token` of the full conversation text (`render_owl2` without a
        generation prompt), i.e. the inference tokenisation; which tokens are answers is read from the
        tokenizer's character offsets against the answer spans (`owl2_segments`), not from re-tokenising
        pieces, so a SentencePiece tokenizer's prefix-space handling cannot shift the mask.
        `system` and `cut` have no effect for Owl2 (interface parity with `Owl3Processor.training_example`).
        """
        from hyperowl.processing.processor import Owl3Processor

        new_messages, pixels = self._expand(messages, images, videos, max_frames, fps, False)
        segments = owl2_segments(new_messages)
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
        return Owl3Processor._package(ids, positions, pixels, text), torch.tensor(labels, dtype=torch.long)

    def _expand(self, messages: Sequence[Any], images: Any, videos: Any, max_frames: int, fps: Optional[float],
                progress: Optional[bool]) -> tuple[list[dict[str, str]], list[torch.Tensor]]:
        """Check placeholder counts, load + preprocess the media, and turn each video into frame placeholders."""
        from hyperowl.processing.processor import Owl3Processor

        pairs = normalize_messages(messages)
        image_list, video_list = _as_list(images, "images"), _as_list(videos, "videos")
        Owl3Processor._check_counts(pairs, image_list, video_list)
        pixels: list[torch.Tensor] = []
        img_i = vid_i = 0
        new_messages = []
        for role, content in pairs:
            out = []
            for piece in content.replace(VIDEO_TOKEN, f"\0{VIDEO_TOKEN}\0").replace(IMAGE_TOKEN, f"\0{IMAGE_TOKEN}\0").split("\0"):
                if piece == IMAGE_TOKEN:
                    src = image_list[img_i]
                    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"images[{img_i}]"
                    pixels.append(preprocess(load_image(src, name=name), self.image_size, self.aspect)[None])
                    img_i += 1
                    out.append(IMAGE_TOKEN)
                elif piece == VIDEO_TOKEN:
                    frames = Owl3Processor._video_frames(video_list[vid_i], vid_i, max_frames, fps, progress)
                    vid_i += 1
                    pixels.append(torch.stack([preprocess(f, self.image_size, self.aspect) for f in frames]))
                    out.append(IMAGE_TOKEN * len(frames))
                else:
                    out.append(piece)
            new_messages.append({"role": role, "content": "".join(out)})
        return new_messages, pixels
