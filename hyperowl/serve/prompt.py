"""Chat request + media bytes -> a planned prompt whose media are cached features or pixels to encode.

Design note: each media part becomes one `<|image|>` / `<|video|>` placeholder at its place in the message
text, and the pipeline's processor plans everything else (cut templates, video frame tokens, the family's
prompt format, tokenization), so the server prompt is exactly the library's prompt, for every family. The
encoder's `lookup` (encoder.py) then finds each item in the feature cache by its content hash, or decodes
and preprocesses it: all of this in a request-handler thread, off the event loop and off the model's
thread, which later runs only the vision tower on the misses (`Encoder.finish`, scheduler.py). An assistant
message the server made itself (a stored response) carries its answer's exact token ids, which the processor
plans in place of its text, so the next turn's prompt starts with the very ids the engine cached.

A video arrives as bytes; the sampler seeks in a file, so it is written to a temporary file for the
duration of planning (header probe) and, on a cache miss, decoding. A cached video is probed (its frame
count) but never decoded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..encoder import Pending
from ..errors import InputError
from ..processing.chat import IMAGE_TOKEN, VIDEO_TOKEN
from ..processing.plan import Hashed
from .media import MediaBlob, decode_image
from .protocol import ApiError, ChatRequest, MediaPart, TextPart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisualOptions:
    cut: bool = True
    max_frames: int = 16
    fps: float | None = None


@dataclass
class PreparedPrompt:
    input_ids: Tensor  # [L]
    image_positions: Tensor | None  # [N] or None without media
    items: list[Pending]  # per media item: cached features, or pixels to encode
    tokens_per_image: int

    @property
    def image_tensors(self) -> int:
        return sum(p.item.count for p in self.items)

    @property
    def visual_tokens(self) -> int:
        return self.image_tensors * self.tokens_per_image

    @property
    def cached_visual_tokens(self) -> int:
        return sum(p.item.count for p in self.items if p.hit) * self.tokens_per_image


def _content_param(where: str | None, index: int) -> str:
    """Where a message's content was in the request: messages[i].content (chat), input[i].content, or the
    field itself when it is the content (the Responses API's `input` string, `instructions`)."""
    if where is None:
        return f"messages[{index}].content"
    return where if where in ("input", "instructions") else f"{where}.content"


def _message_text(parts: list[TextPart | MediaPart], where: str) -> str:
    out = []
    for j, p in enumerate(parts):
        if isinstance(p, TextPart):
            if IMAGE_TOKEN in p.text or VIDEO_TOKEN in p.text:
                param = where + ("" if len(parts) == 1 else f"[{j}]")
                raise ApiError(400, f"{param}: text must not contain {IMAGE_TOKEN} or {VIDEO_TOKEN}; send images as "
                                    "image_url parts and videos as video_url parts", param=param,
                               code="invalid_value")
            out.append(p.text)
        else:
            out.append(IMAGE_TOKEN if p.kind == "image" else VIDEO_TOKEN)
    return "".join(out)


def build_prompt(req: ChatRequest, blobs: list[MediaBlob], pipeline: Any, opts: VisualOptions) -> PreparedPrompt:
    """Synchronous (decodes media, tokenizes): run it off the event loop."""
    messages = [{"role": m.role, "content": _message_text(m.parts, _content_param(m.param, i))}
                for i, m in enumerate(req.messages)]
    images, videos, temp = [], [], {}
    try:
        for blob in blobs:
            if blob.kind == "image":  # keyed by the digest of the bytes received (hashed once, in media.py)
                images.append(Hashed(decode_image(blob), blob.digest))
            else:
                fd, name = tempfile.mkstemp(prefix="hyperowl-video-")
                temp[name] = blob
                with os.fdopen(fd, "wb") as f:
                    f.write(blob.data)
                videos.append(name)
        try:
            answer_ids = {i: m.ids for i, m in enumerate(req.messages) if m.ids is not None}
            plan = pipeline.processor.plan(messages, images=images, videos=videos, max_frames=opts.max_frames,
                                           fps=opts.fps, cut=opts.cut, answer_ids=answer_ids)
            pending = pipeline.encoder.lookup(plan)
        except InputError as e:
            raise _media_error(e, temp) from None
        except Exception as e:  # a decoder failure we do not know: still the input's fault if a video is involved
            if not temp:
                raise
            log.warning("unexpected video decode failure", exc_info=True)
            params = [b.param for b in temp.values()]
            param = params[0] if len(params) == 1 else "messages"  # which of several videos: not known here
            raise ApiError(400, f"{' or '.join(params)}: cannot decode the video ({type(e).__name__})", param=param,
                           code="invalid_video") from None
    finally:
        for name in temp:
            os.unlink(name)
    return PreparedPrompt(plan.input_ids, plan.image_positions if plan.items else None, pending,
                          pipeline.family.feature_tokens(pipeline.model.config))


def _media_error(e: InputError, temp: dict[str, MediaBlob]) -> ApiError:
    """An InputError about a video's temporary file names the request's content part instead."""
    msg = str(e)
    for name, blob in temp.items():
        if name in msg:
            return ApiError(400, msg.replace(name, blob.param), param=blob.param, code="invalid_video")
    return ApiError(400, msg, param="messages", code="invalid_value")
