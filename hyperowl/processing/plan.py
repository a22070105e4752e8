"""What a processor plans: token ids, where each image sits, and the ordered media items to encode.

Design note
-----------
A processor turns messages + media into a `Plan` and never calls the model. Each `<|image|>` or
`<|video|>` placeholder becomes one `MediaItem`, in placeholder order: an image (its decoded PIL image
and, when cut, its grid: rows*cols crops + a global view), or a video (a file whose frames are only
*sampled* here: the sampling times come from the container's headers, nothing is decoded; a list of PIL
frames; or pixel values made earlier). `item.count` is how many `<|image|>` tokens (and image tensors) it
contributes, so the prompt is complete before any pixel exists.

`item.key` is the item's content hash (SHA-256 of the file's or the bytes' content, of a PIL image's
pixels, of a pixel tensor; or the caller's, for an image given as `Hashed`) plus everything that changes its features (the processor's pixel recipe,
cutting, frame sampling). It is computed on first use, so a caller that never caches never hashes. The
encoding stage (`hyperowl.encoder`) is the one place that turns items into pixels and features.

`PlannerBase` holds what both families share: placeholder counting, the expansion loop, video items,
pixel making per item, and the compatibility call `processor(messages, ...) -> ProcessedInputs` (plan +
pixels, as before). Subclasses say how an image or a video is written in the prompt, how the prompt is
rendered and tokenized, and how an image or frame becomes pixels.

Exact answer ids (`plan(..., answer_ids={message index: ids})`): a server that made an assistant message
itself knows the token ids it generated, and its text often does not tokenize back to them (decode then
encode gives other ids, always so for a random model, sometimes for a trained one). A family whose template
can be cut safely around an answer tokenizes the conversation piece by piece and puts those ids in place of
that message's text, so the prompt starts with exactly the ids the previous turn's K/V were computed from
(its prompt + its answer) and a prefix cache serves the whole history. Owl3 (ChatML) does: the text before an
answer is that turn's prompt, and the text after it starts with `<|im_end|>`, a special token the tokenizer
never merges with what precedes it. Owl2 does not: its SentencePiece tokenizer marks word starts with a
prefix space whose placement depends on what precedes a piece (how `</s>USER: ...` after an answer is split
depends on the tokenizer's legacy mode, and every chunk is encoded with a leading BOS/space rule), so cutting
its text around an answer can change tokens; it tokenizes the text as before.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from PIL import Image

from hyperowl.errors import InputError
from hyperowl.processing.chat import IMAGE_TOKEN, VIDEO_TOKEN, normalize_messages
from hyperowl.processing.images import load_image

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
_HASH_CHUNK = 1 << 20


def _digest_source(src: Any) -> str:
    """SHA-256 of a media source's content: file bytes, encoded bytes, a PIL image's pixels, a frame list,
    or a pixel tensor."""
    h = hashlib.sha256()
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    elif isinstance(src, (bytes, bytearray)):
        h.update(src)
    elif isinstance(src, Image.Image):
        h.update(f"{src.mode}{src.size}".encode())
        h.update(src.tobytes())
    elif isinstance(src, torch.Tensor):
        t = src.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(src, (list, tuple)):
        for part in src:
            h.update(_digest_source(part).encode())
    else:
        raise TypeError(f"cannot hash a {type(src).__name__}")
    return h.hexdigest()


@dataclass(frozen=True)
class Hashed:
    """A media source whose content hash the caller already has (a server hashed the bytes it received): its
    item's key uses `digest` (the SHA-256 hex of the encoded bytes, as a bytes source is hashed) instead of
    hashing the source again."""

    source: Any
    digest: str


@dataclass
class MediaItem:
    """One image or video of a prompt, planned but not yet turned into pixels or features."""

    kind: str  # "image" | "video"
    name: str  # how error messages call it: the path, or images[i] / videos[i]
    count: int  # image tensors (and <|image|> tokens) it contributes: crops + global view, or frames
    source: Any  # image: the source as given (for hashing); video: a path, a list of PIL frames, or pixels
    image: Optional[Image.Image] = None  # image: decoded RGB
    grid: Optional[tuple[int, int]] = None  # image cut into rows x cols crops + a global view (None: not cut)
    times: Optional[list[float]] = None  # video file: each sampled frame's time (seconds); None if unknown
    max_frames: int = 16  # video file: sampling options (the decoder needs them again)
    fps: Optional[float] = None
    recipe: str = ""  # the processor's pixel recipe (family, size, aspect mode): part of the key
    digest: Optional[str] = None  # the source's content hash when the caller gave it (`Hashed`)
    _key: Optional[str] = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """Content hash + what changes the features: equal keys = equal features for one model."""
        if self._key is None:
            how = f"grid={self.grid}" if self.kind == "image" else f"frames={self.max_frames},fps={self.fps}"
            if self.kind == "video" and not isinstance(self.source, (str, os.PathLike)):
                how = f"frames={self.count}"  # given frames/pixels: no sampling
            src = self.source if not isinstance(self.source, Image.Image) else self.image
            self._key = f"{self.kind}:{self.digest or _digest_source(src)}:{self.recipe}:{how}"
        return self._key


@dataclass
class Plan:
    """One prompt, planned: token ids [L], each image tensor's placeholder index [N], the media items
    (their counts add up to N), the rendered text, and labels [L] for a training example."""

    input_ids: torch.Tensor
    image_positions: torch.Tensor
    items: list[MediaItem]
    prompt: str
    labels: Optional[torch.Tensor] = None

    @property
    def num_images(self) -> int:
        return int(self.image_positions.numel())


@dataclass
class ProcessedInputs:
    """One prompt with pixels, ready for the model's drop-in forward (training, tests, scripts)."""

    input_ids: torch.Tensor  # int64 [L]
    pixel_values: Optional[torch.Tensor]  # float32 [N, 3, S, S], None when the prompt has no images
    image_positions: torch.Tensor  # int64 [N]: index in input_ids of each image's <|image|> token
    prompt: str  # the rendered text (with expanded placeholders)
    image_embeds: Optional[torch.Tensor] = None  # features [N, T, H] instead of pixels (engine requests)

    @property
    def num_images(self) -> int:
        return int(self.image_positions.numel())


def as_list(items: Any, what: str) -> list[Any]:
    """Accept None, one item, or a list/tuple of items."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, bytearray, os.PathLike, Image.Image, Hashed)):
        return [items]
    if isinstance(items, torch.Tensor) and what == "videos":  # one video's pixels
        return [items]
    if isinstance(items, (list, tuple)):
        return list(items)
    raise InputError(f"{what}: expected a list, got {type(items).__name__}")


def check_counts(pairs: list[tuple[str, str]], image_list: list[Any], video_list: list[Any]) -> None:
    if video_list and all(isinstance(v, Image.Image) for v in video_list):
        raise InputError("videos: got a flat list of PIL frames; pass a list of videos, e.g. videos=[frames]")
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


def source_name(src: Any, what: str, index: int) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"{what}[{index}]"


class PlannerBase:
    """Shared planning for the Owl3 and Owl2 processors (see the module note)."""

    tokenizer: Any
    image_size: int
    cut: bool = False

    # -- what subclasses define ----------------------------------------------------------------------------
    @property
    def recipe(self) -> str:
        """Everything about this processor that changes an item's pixels (part of each item's key)."""
        raise NotImplementedError

    def _image_item(self, item: MediaItem, cut: bool) -> str:
        """Set item.count / item.grid for an image and return its text in the prompt."""
        raise NotImplementedError

    def _video_text(self, n_frames: int) -> str:
        raise NotImplementedError

    def _render_and_tokenize(self, messages: list[dict[str, str]], system: Optional[str],
                             add_generation_prompt: bool, answer_ids: Optional[Mapping[int, Sequence[int]]] = None
                             ) -> tuple[list[int], list[int], str]:
        """(ids, image positions, text); `answer_ids`: exact content ids of assistant messages by index, used
        where the family's template can be cut around them (module note), else ignored."""
        raise NotImplementedError

    def _training_ids(self, messages: list[dict[str, str]], system: Optional[str]
                      ) -> tuple[list[int], list[int], list[int], str]:
        """(ids, image positions, labels, text) of a whole conversation."""
        raise NotImplementedError

    def image_pixels(self, item: MediaItem) -> torch.Tensor:
        """An image item -> pixels [item.count, 3, S, S]."""
        raise NotImplementedError

    def frame_pixels(self, frames: Sequence[Image.Image] | Iterable[Image.Image], count: int) -> torch.Tensor:
        """Video frames (RGB PIL) -> pixels [count, 3, S, S]."""
        raise NotImplementedError

    # -- planning --------------------------------------------------------------------------------------------
    def plan(self, messages: Sequence[Any], images: Any = None, videos: Any = None, *, max_frames: int = 16,
             fps: Optional[float] = None, system: Optional[str] = None, cut: Optional[bool] = None,
             add_generation_prompt: bool = True, answer_ids: Optional[Mapping[int, Sequence[int]]] = None) -> Plan:
        """messages + media -> `Plan` (ids, image positions, media items). Nothing is encoded; video files
        are only probed for their sampling times. `answer_ids`: {index in messages: the exact token ids of that
        assistant message's content} (module note: exact answer ids)."""
        new_messages, items = self._expand(messages, images, videos, cut, max_frames, fps, system)
        ids, positions, prompt = self._render_and_tokenize(new_messages, system, add_generation_prompt,
                                                           answer_ids or None)
        return self._package(ids, positions, items, prompt)

    def training_plan(self, messages: Sequence[Any], images: Any = None, videos: Any = None, *,
                      max_frames: int = 16, fps: Optional[float] = None, system: Optional[str] = None,
                      cut: Optional[bool] = None) -> Plan:
        """A whole conversation for training: the plan plus `labels` (answer tokens, -100 elsewhere)."""
        new_messages, items = self._expand(messages, images, videos, cut, max_frames, fps, system)
        ids, positions, labels, text = self._training_ids(new_messages, system)
        plan = self._package(ids, positions, items, text)
        plan.labels = torch.tensor(labels, dtype=torch.long)
        return plan

    def _expand(self, messages: Sequence[Any], images: Any, videos: Any, cut: Optional[bool], max_frames: int,
                fps: Optional[float], system: Optional[str]) -> tuple[list[dict[str, str]], list[MediaItem]]:
        """Replace placeholders by their expanded text; one MediaItem per placeholder, in order."""
        pairs = normalize_messages(messages)  # validated copy; the caller's dicts are not touched
        image_list, video_list = as_list(images, "images"), as_list(videos, "videos")
        if system is not None and (IMAGE_TOKEN in system or VIDEO_TOKEN in system):
            raise InputError(f"system: must not contain {IMAGE_TOKEN} or {VIDEO_TOKEN}; put media in a user message")
        check_counts(pairs, image_list, video_list)
        do_cut = self.cut if cut is None else cut
        items: list[MediaItem] = []
        img_i = vid_i = 0
        new_messages: list[dict[str, str]] = []
        for role, content in pairs:
            out: list[str] = []
            for piece in _PLACEHOLDER_RE.split(content):
                if piece == IMAGE_TOKEN:
                    src, digest = image_list[img_i], None
                    if isinstance(src, Hashed):
                        src, digest = src.source, src.digest
                    name = source_name(src, "images", img_i)
                    item = MediaItem("image", name, 1, src, image=load_image(src, name=name), recipe=self.recipe,
                                     digest=digest)
                    out.append(self._image_item(item, do_cut))
                    img_i += 1
                elif piece == VIDEO_TOKEN:
                    item = self._video_item(video_list[vid_i], vid_i, max_frames, fps)
                    out.append(self._video_text(item.count))
                    vid_i += 1
                else:
                    out.append(piece)
                    continue
                items.append(item)
            new_messages.append({"role": role, "content": "".join(out)})
        return new_messages, items

    def _video_item(self, src: Any, index: int, max_frames: int, fps: Optional[float]) -> MediaItem:
        from hyperowl.processing.video import probe_video

        name = source_name(src, "videos", index)
        if isinstance(src, (str, os.PathLike)):
            times = probe_video(src, max_frames=max_frames, fps=fps)
            return MediaItem("video", name, len(times), src, times=times, max_frames=max_frames, fps=fps,
                             recipe=self.recipe)
        if isinstance(src, torch.Tensor):
            s = self.image_size
            if src.dim() != 4 or tuple(src.shape[1:]) != (3, s, s) or not src.is_floating_point() or src.shape[0] < 1:
                raise InputError(f"videos[{index}]: a tensor must hold pixel values [frames, 3, {s}, {s}] (float, at "
                                 f"least one frame), got {src.dtype} {list(src.shape)}; "
                                 "make them with processor.video_pixels(path)")
            return MediaItem("video", name, src.shape[0], src, recipe=self.recipe)
        if isinstance(src, (list, tuple)):
            if not src:
                raise InputError(f"videos[{index}]: empty frame list; pass at least one frame")
            frames = []
            for j, f in enumerate(src):
                if not isinstance(f, Image.Image):
                    raise InputError(f"videos[{index}][{j}]: expected a PIL image, got {type(f).__name__}; "
                                     "pass a video path or a list of PIL frames")
                frames.append(f if f.mode == "RGB" else f.convert("RGB"))
            return MediaItem("video", name, len(frames), frames, recipe=self.recipe)
        raise InputError(f"videos[{index}]: expected a video file path, a list of PIL frames or a pixel tensor, "
                         f"got {type(src).__name__}")

    @staticmethod
    def _package(ids: list[int], positions: list[int], items: list[MediaItem], prompt: str) -> Plan:
        n = sum(item.count for item in items)
        if len(positions) != n:
            # Only if a template or the tokenizer disagrees with our expansion: a bug, not a user error.
            raise RuntimeError(f"internal error: {len(positions)} image tokens but {n} image tensors planned")
        return Plan(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), items, prompt)

    # -- pixels (no model) -----------------------------------------------------------------------------------
    def item_pixels(self, item: MediaItem, progress: Optional[bool] = False) -> torch.Tensor:
        """One item's pixels [item.count, 3, S, S]. A video file is decoded here, frame by frame, resized into
        one preallocated tensor (no decoded frame is kept)."""
        if item.kind == "image":
            return self.image_pixels(item)
        if isinstance(item.source, torch.Tensor):
            return item.source
        if isinstance(item.source, (list, tuple)):
            return self.frame_pixels(item.source, item.count)
        return self.frame_pixels(self.decode_frames(item, progress), item.count)

    def decode_frames(self, item: MediaItem, progress: Optional[bool] = False) -> Iterable[Image.Image]:
        """A video file item's sampled frames, as they decode."""
        from hyperowl.processing.video import iter_video

        frames = (im for _, im in iter_video(item.source, max_frames=item.max_frames, fps=item.fps, progress=progress))
        return _exactly(frames, item.count, item.name)

    def pixels(self, plan: Plan, progress: Optional[bool] = False) -> Optional[torch.Tensor]:
        """All of a plan's pixels [N, 3, S, S] in placeholder order (None without media)."""
        if not plan.items:
            return None
        parts = [self.item_pixels(item, progress) for item in plan.items]
        # One media item (the usual case): its tensor as is; a cat would copy a long video's pixels again.
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def video_pixels(self, path: "str | os.PathLike[str]", max_frames: int = 16, fps: Optional[float] = None,
                     progress: Optional[bool] = None) -> torch.Tensor:
        """A video file's sampled frames as pixel values [F, 3, S, S] (pass them on as `videos=[pixels]`)."""
        return self.item_pixels(self._video_item(path, 0, max_frames, fps), progress)

    # -- the compatibility call: plan + pixels -------------------------------------------------------------------
    def __call__(self, messages: Sequence[Any], images: Any = None, videos: Any = None, max_frames: int = 16,
                 fps: Optional[float] = None, system: Optional[str] = None, cut: Optional[bool] = None,
                 add_generation_prompt: bool = True, progress: Optional[bool] = None) -> ProcessedInputs:
        """Model inputs with pixels (for the drop-in forward, training and scripts). Inference through
        `hyperowl.load()` plans and lets the encoder make features instead."""
        p = self.plan(messages, images, videos, max_frames=max_frames, fps=fps, system=system, cut=cut,
                      add_generation_prompt=add_generation_prompt)
        return ProcessedInputs(p.input_ids, self.pixels(p, progress), p.image_positions, p.prompt)

    def training_example(self, messages: Sequence[Any], images: Any = None, videos: Any = None, *,
                         max_frames: int = 16, fps: Optional[float] = None, system: Optional[str] = None,
                         cut: Optional[bool] = None) -> tuple[ProcessedInputs, torch.Tensor]:
        """(inputs with pixels, labels [L]) of a whole conversation (see `training_plan`)."""
        p = self.training_plan(messages, images, videos, max_frames=max_frames, fps=fps, system=system, cut=cut)
        return ProcessedInputs(p.input_ids, self.pixels(p), p.image_positions, p.prompt), p.labels


def _exactly(frames: Iterable[Image.Image], count: int, name: str) -> Iterator[Image.Image]:
    """The planned number of frames, or an error naming the video (its headers promised another count)."""
    n = 0
    for f in frames:
        n += 1
        if n > count:
            raise InputError(f"video '{name}': decoded more frames than its headers announced ({count}); "
                             "re-encode the file (e.g. ffmpeg -i in.mp4 out.mp4)")
        yield f
    if n != count:
        raise InputError(f"video '{name}': {n} frames decoded, {count} planned from its headers; "
                         "re-encode the file (e.g. ffmpeg -i in.mp4 out.mp4)")

