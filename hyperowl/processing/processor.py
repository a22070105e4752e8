"""Turn chat messages + images + videos into model inputs for mPLUG-Owl3.

Design note
-----------
Placeholders: every `<|image|>` in the message text consumes the next entry of `images`, every
`<|video|>` the next entry of `videos`, in order of appearance across all messages. Each placeholder is
expanded in the text before ChatML rendering:
  * image, cutting on:  the cut template (240728 "v2_global", 241101 "v3_global") with rows*cols + 1
    `<|image|>` tokens, and pixels = crops (row-major) + global view;
  * image, cutting off: one `<|image|>`, pixels = the image resized to size x size;
  * video: one `<|image|>` per frame (241101 wraps them in `<|start_video_frame|>`..`<|end_video_frame|>`),
    never cut. A video is a file (frames are resized as they decode; no full-size frame is kept), a list of
    PIL frames, or pixel values [F, 3, S, S] made earlier (`video_pixels`, e.g. by a server off its loop).
Each image is expanded with *its own* grid. The official 240728 processor indexes its per-crop shape
list by image number, so every image after the first gets a wrong template and the token count stops
matching the pixel count (spec section 4); we deliberately do not reproduce that bug. The invariant
"number of `<|image|>` tokens == number of pixel tensors" is checked on every call.

Tokenisation splits the rendered prompt on `<|image|>`, encodes each text chunk separately (as the
official processor does) and inserts the image token id between chunks, recording each image token's
index (`image_positions`), which is all the model needs to place images (240728 media_offset and the
241101 start list are both derived from it). `collate` left-pads a batch and shifts those positions.

The caller's messages are never mutated; all expansion happens on copies of the strings.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image
from tokenizers import Tokenizer

from hyperowl.errors import InputError
from hyperowl.processing.chat import (
    chatml_segments,
    END_CUT,
    END_VIDEO_FRAME,
    IMAGE_TOKEN,
    START_CUT,
    START_VIDEO_FRAME,
    VIDEO_TOKEN,
    normalize_messages,
    render_chatml,
)
from hyperowl.processing.images import ImageSource, cut_image, cut_prompt, image_to_tensor, images_to_tensor, load_image
from hyperowl.processing.overlap import chunked, encode_overlapped
from hyperowl.processing.video import VideoSample, iter_video

logger = logging.getLogger(__name__)

VARIANTS = ("240728", "241101")
_CUT_TEMPLATE = {"240728": "v2_global", "241101": "v3_global"}
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")

VideoSource = Union[str, os.PathLike, Sequence[Image.Image], torch.Tensor]  # tensor: pixels [F, 3, S, S]


@dataclass
class ProcessedInputs:
    """One prompt ready for the model."""

    input_ids: torch.Tensor  # int64 [L]
    pixel_values: Optional[torch.Tensor]  # float32 [N, 3, S, S], None when the prompt has no images
    image_positions: torch.Tensor  # int64 [N]: index in input_ids of each image's <|image|> token
    prompt: str  # the rendered text (with expanded placeholders)
    # With `encode=` given: the images' embeddings [N, T, H] instead of pixel_values (which is then None).
    image_embeds: Optional[torch.Tensor] = None

    @property
    def num_images(self) -> int:
        return int(self.image_positions.numel())


@dataclass
class BatchInputs:
    """A left-padded batch of prompts."""

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]: 1 for real tokens, 0 for padding
    pixel_values: Optional[torch.Tensor]  # float32 [N_total, 3, S, S], rows' images in row order, or None
    image_positions: torch.Tensor  # int64 [B, N_max]: token index in the padded row, -1 where absent
    image_counts: torch.Tensor  # int64 [B]: images per row


def _as_list(items: Any, what: str) -> list[Any]:
    """Accept None, one item, or a list/tuple of items."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, bytearray, os.PathLike, Image.Image)):
        return [items]
    if isinstance(items, torch.Tensor) and what == "videos":  # one video's pixels
        return [items]
    if isinstance(items, (list, tuple)):
        return list(items)
    raise InputError(f"{what}: expected a list, got {type(items).__name__}")


class Owl3Processor:
    """Prompt + pixel preprocessing for mPLUG-Owl3 (variants "240728" and "241101")."""

    def __init__(self, tokenizer: Tokenizer, variant: str = "240728", image_size: int = 384, cut: bool = True) -> None:
        if variant not in VARIANTS:
            raise InputError(f"variant {variant!r}: must be one of {', '.join(VARIANTS)}")
        if image_size < 1:
            raise InputError(f"image_size={image_size}: must be a positive number of pixels")
        self.tokenizer = tokenizer
        self.variant = variant
        self.image_size = int(image_size)
        self.cut = cut
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            raise InputError(
                f"tokenizer: has no {IMAGE_TOKEN} token; use the tokenizer.json shipped with the mPLUG-Owl3 checkpoint"
            )
        self.image_token_id: int = image_id
        if variant == "241101":
            missing = [
                t for t in (START_CUT, END_CUT, START_VIDEO_FRAME, END_VIDEO_FRAME) if tokenizer.token_to_id(t) is None
            ]
            if missing:
                # Still usable (they tokenize as plain text), but not what the model was trained on.
                logger.warning("tokenizer lacks 241101 tokens %s; they will be split as text", ", ".join(missing))

    @classmethod
    def from_dir(cls, path: "str | os.PathLike[str]", variant: str = "240728", image_size: int = 384,
                 cut: bool = True) -> "Owl3Processor":
        """Load `tokenizer.json` from a checkpoint directory."""
        tok_path = Path(path) / "tokenizer.json"
        if not tok_path.is_file():
            raise InputError(
                f"checkpoint '{path}': tokenizer.json not found; pass a checkpoint directory that contains tokenizer.json"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise InputError(f"tokenizer '{tok_path}': cannot be loaded ({exc}); re-download the checkpoint's tokenizer.json") from None
        return cls(tokenizer, variant=variant, image_size=image_size, cut=cut)

    # -- text pieces -------------------------------------------------------------------------------------

    def _video_text(self, n_frames: int) -> str:
        frames = IMAGE_TOKEN * n_frames
        if self.variant == "241101":
            return f"{START_VIDEO_FRAME}{frames}{END_VIDEO_FRAME}"
        return frames

    def _tokenize(self, prompt: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        chunks = prompt.split(IMAGE_TOKEN)
        for k, chunk in enumerate(chunks):
            if k > 0:
                positions.append(len(ids))
                ids.append(self.image_token_id)
            if chunk:
                ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False).ids)
        return ids, positions

    # -- main entry --------------------------------------------------------------------------------------

    def __call__(
        self,
        messages: Sequence[Any],
        images: Union[ImageSource, Sequence[ImageSource], None] = None,
        videos: Union[VideoSource, Sequence[VideoSource], None] = None,
        max_frames: int = 16,
        fps: Optional[float] = None,
        system: Optional[str] = None,
        cut: Optional[bool] = None,
        add_generation_prompt: bool = True,
        progress: Optional[bool] = None,
        encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        encode_chunk: int = 16,
        overlap: bool = True,
    ) -> ProcessedInputs:
        """Build model inputs. See the module note for how placeholders are expanded.

        encode (e.g. `model.encode_images`): return `image_embeds` instead of pixels. Each image is encoded
        as soon as it is loaded; a video file is decoded in a background thread, `encode_chunk` frames at a
        time, while the tower encodes the frames already decoded (processing/overlap.py): the tower starts
        before the last frame is decoded and only a few chunks of pixels exist at once. overlap=False:
        the same chunks decoded and encoded in turn, in this thread (bounded memory; for CPU-only runs,
        where decoding and the tower share the cores)."""
        pairs = normalize_messages(messages)  # validated copy; the caller's dicts are not touched
        image_list = _as_list(images, "images")
        video_list = _as_list(videos, "videos")
        if system is not None and (IMAGE_TOKEN in system or VIDEO_TOKEN in system):
            raise InputError(f"system: must not contain {IMAGE_TOKEN} or {VIDEO_TOKEN}; put media in a user message")
        self._check_counts(pairs, image_list, video_list)
        if encode_chunk < 1:
            raise InputError(f"encode_chunk={encode_chunk}: must be at least 1 frame")
        new_messages, pixels = self._expand(pairs, image_list, video_list, cut, max_frames, fps, progress, encode,
                                            encode_chunk, overlap)
        kwargs = {} if system is None else {"system": system}
        prompt = render_chatml(new_messages, add_generation_prompt=add_generation_prompt, **kwargs)
        ids, positions = self._tokenize(prompt)
        return self._package(ids, positions, pixels, prompt, encoded=encode is not None)

    def training_example(self, messages: Sequence[Any], images: Any = None, videos: Any = None, *,
                         max_frames: int = 16, fps: Optional[float] = None, system: Optional[str] = None,
                         cut: Optional[bool] = None) -> tuple[ProcessedInputs, torch.Tensor]:
        """A whole conversation for training: inputs plus `labels` [L] (token ids on assistant answers and
        their <|im_end|>, -100 elsewhere). Tokenized per ChatML segment, as the prompt is at inference."""
        pairs = normalize_messages(messages)
        self._check_counts(pairs, _as_list(images, "images"), _as_list(videos, "videos"))
        new_messages, pixels = self._expand(pairs, _as_list(images, "images"), _as_list(videos, "videos"),
                                            cut, max_frames, fps, False)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for text, trainable in chatml_segments(new_messages, **({} if system is None else {"system": system})):
            seg_ids, seg_pos = self._tokenize(text)
            positions += [len(ids) + p for p in seg_pos]
            ids += seg_ids
            labels += seg_ids if trainable else [-100] * len(seg_ids)
        return self._package(ids, positions, pixels, ""), torch.tensor(labels, dtype=torch.long)

    @staticmethod
    def _check_counts(pairs: list[tuple[str, str]], image_list: list[Any], video_list: list[Any]) -> None:
        if video_list and all(isinstance(v, Image.Image) for v in video_list):
            raise InputError(
                "videos: got a flat list of PIL frames; pass a list of videos, e.g. videos=[frames]"
            )
        n_img = sum(c.count(IMAGE_TOKEN) for _, c in pairs)
        n_vid = sum(c.count(VIDEO_TOKEN) for _, c in pairs)
        if n_img != len(image_list):
            raise InputError(
                f"messages contain {n_img} {IMAGE_TOKEN} placeholder(s) but {len(image_list)} image(s) were given: "
                f"put one {IMAGE_TOKEN} per image in the text"
            )
        if n_vid != len(video_list):
            raise InputError(
                f"messages contain {n_vid} {VIDEO_TOKEN} placeholder(s) but {len(video_list)} video(s) were given: "
                f"put one {VIDEO_TOKEN} per video in the text"
            )

    @staticmethod
    def _package(ids: list[int], positions: list[int], pixels: list[torch.Tensor], prompt: str,
                 encoded: bool = False) -> ProcessedInputs:
        """pixels: one tensor per media item ([n, 3, S, S], or its embeddings [n, T, H] when `encoded`)."""
        # One media item (the usual case): its tensor as is; a cat would copy a long video's embeddings again.
        values = (pixels[0] if len(pixels) == 1 else torch.cat(pixels, dim=0)) if pixels else None
        n_pixels = 0 if values is None else values.shape[0]
        if len(positions) != n_pixels:
            # Can only happen if a template or the tokenizer disagrees with our expansion: a bug, not user error.
            raise RuntimeError(f"internal error: {len(positions)} image tokens but {n_pixels} pixel tensors")
        return ProcessedInputs(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=None if encoded else values,
            image_positions=torch.tensor(positions, dtype=torch.long),
            prompt=prompt,
            image_embeds=values if encoded else None,
        )

    def _expand(self, pairs: list[tuple[str, str]], image_list: list[Any], video_list: list[Any], cut: Optional[bool],
                max_frames: int, fps: Optional[float], progress: Optional[bool],
                encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                encode_chunk: int = 16, overlap: bool = True) -> tuple[list[dict[str, str]], list[torch.Tensor]]:
        """Replace placeholders by their expanded text (cut templates, video frames); collect pixel tensors
        (or, with `encode`, their embeddings)."""
        enc = encode if encode is not None else (lambda px: px)
        do_cut = self.cut if cut is None else cut
        template = _CUT_TEMPLATE[self.variant]
        size = self.image_size
        pixels: list[torch.Tensor] = []
        img_i = vid_i = 0
        new_messages: list[dict[str, str]] = []
        for role, content in pairs:
            pieces = _PLACEHOLDER_RE.split(content)
            out: list[str] = []
            for piece in pieces:
                if piece == IMAGE_TOKEN:
                    img = load_image(image_list[img_i], name=self._image_name(image_list[img_i], img_i))
                    img_i += 1
                    if do_cut:
                        px, (rows, cols) = cut_image(img, size)
                        pixels.append(enc(px))
                        out.append(cut_prompt(rows, cols, template, IMAGE_TOKEN))
                    else:
                        pixels.append(enc(image_to_tensor(img, size).unsqueeze(0)))
                        out.append(IMAGE_TOKEN)
                elif piece == VIDEO_TOKEN:
                    src = video_list[vid_i]
                    vid_i += 1
                    if isinstance(src, (str, os.PathLike)):
                        pixels.append(self._video_file(src, max_frames, fps, progress, encode, encode_chunk, overlap))
                    elif isinstance(src, torch.Tensor):
                        pixels.append(enc(self._video_tensor(src, vid_i - 1)))
                    else:
                        frames = self._video_frames(src, vid_i - 1)
                        pixels.append(enc(images_to_tensor(frames, size, len(frames))))
                    out.append(self._video_text(pixels[-1].shape[0]))
                else:
                    out.append(piece)
            new_messages.append({"role": role, "content": "".join(out)})

        return new_messages, pixels

    @staticmethod
    def _image_name(src: Any, index: int) -> str:
        if isinstance(src, (str, os.PathLike)):
            return os.fspath(src)
        return f"images[{index}]"

    def video_pixels(self, path: Union[str, os.PathLike], max_frames: int = 16, fps: Optional[float] = None,
                     progress: Optional[bool] = None) -> torch.Tensor:
        """A video file's sampled frames as pixel values [F, 3, S, S] (pass them on as `videos=[pixels]`).
        Frames are resized as they decode: the video's full-size frames are never held at once."""
        return self._video_file(path, max_frames, fps, progress, encode=None, encode_chunk=1, overlap=False)

    def _video_tensor(self, px: torch.Tensor, index: int) -> torch.Tensor:
        s = self.image_size
        if px.dim() != 4 or tuple(px.shape[1:]) != (3, s, s) or not px.is_floating_point() or px.shape[0] < 1:
            raise InputError(f"videos[{index}]: a tensor must hold pixel values [frames, 3, {s}, {s}] (float, at "
                             f"least one frame), got {px.dtype} {list(px.shape)}; "
                             "make them with processor.video_pixels(path)")
        return px

    def _video_file(self, src: Union[str, os.PathLike], max_frames: int, fps: Optional[float],
                    progress: Optional[bool], encode: Optional[Callable[[torch.Tensor], torch.Tensor]],
                    encode_chunk: int, overlap: bool) -> torch.Tensor:
        """A video file's sampled frames as pixels [F, 3, S, S], or with `encode` their embeddings: decoded
        frame by frame and resized into one preallocated tensor (no decoded frame is kept); with `encode`,
        `encode_chunk` frames at a time go to the tower (overlapped with decoding when `overlap`)."""
        size = self.image_size
        st = VideoSample(frames=[], times=[])  # its targets (one per frame) are known once the file is open
        frames = (im for _, im in iter_video(src, max_frames=max_frames, fps=fps, progress=progress, stats=st))
        if encode is None:
            return images_to_tensor(frames, size, lambda: len(st.targets))
        chunks = (images_to_tensor(group, size, len(group)) for group in chunked(frames, encode_chunk))
        return encode_overlapped(chunks, encode, threaded=overlap, total=lambda: len(st.targets))

    @staticmethod
    def _video_frames(src: Any, index: int) -> list[Image.Image]:
        if isinstance(src, (list, tuple)):
            if not src:
                raise InputError(f"videos[{index}]: empty frame list; pass at least one frame")
            frames = []
            for j, f in enumerate(src):
                if not isinstance(f, Image.Image):
                    raise InputError(
                        f"videos[{index}][{j}]: expected a PIL image, got {type(f).__name__}; "
                        "pass a video path or a list of PIL frames"
                    )
                frames.append(f if f.mode == "RGB" else f.convert("RGB"))
            return frames
        raise InputError(
            f"videos[{index}]: expected a video file path, a list of PIL frames or a pixel tensor, "
            f"got {type(src).__name__}"
        )


def collate(batch: Sequence[ProcessedInputs], pad_id: int) -> BatchInputs:
    """Left-pad a list of `ProcessedInputs` into one batch (image positions shifted by each row's padding).

    Also takes any object with `input_ids`, `pixel_values` and `image_positions` (None = no images), such as
    the engine's requests; a row whose images come as precomputed features has `pixel_values` None.
    """
    if not batch:
        raise InputError("batch: empty; pass at least one processed prompt")
    lengths = [int(b.input_ids.numel()) for b in batch]
    width = max(lengths)
    counts = [0 if b.image_positions is None else int(b.image_positions.numel()) for b in batch]
    n_max = max(counts)
    bsz = len(batch)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, width), dtype=torch.long)
    positions = torch.full((bsz, n_max), -1, dtype=torch.long)
    pixels: list[torch.Tensor] = []
    for r, b in enumerate(batch):
        pad = width - lengths[r]
        input_ids[r, pad:] = torch.as_tensor(b.input_ids, dtype=torch.long)
        attention_mask[r, pad:] = 1
        if counts[r]:
            positions[r, : counts[r]] = torch.as_tensor(b.image_positions, dtype=torch.long) + pad
        if b.pixel_values is not None:
            if b.pixel_values.shape[0] != counts[r]:
                raise InputError(f"batch row {r}: {b.pixel_values.shape[0]} pixel tensors for {counts[r]} image positions")
            pixels.append(b.pixel_values)
    sizes = {tuple(p.shape[1:]) for p in pixels}
    if len(sizes) > 1:
        raise InputError(f"batch: rows have different image sizes {sorted(sizes)}; use one processor for the batch")
    return BatchInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels, dim=0) if pixels else None,
        image_positions=positions,
        image_counts=torch.tensor(counts, dtype=torch.long),
    )
