"""The mPLUG-Owl3 processor: chat messages + images + videos -> a `Plan` (ChatML, cut templates).

Design note
-----------
Placeholders: every `<|image|>` in the message text consumes the next entry of `images`, every
`<|video|>` the next entry of `videos`, in order of appearance across all messages. Each placeholder is
expanded in the text before ChatML rendering:
  * image, cutting on:  the cut template (240728 "v2_global", 241101 "v3_global") with rows*cols + 1
    `<|image|>` tokens; its pixels will be the crops (row-major) + the global view;
  * image, cutting off: one `<|image|>`, the image resized to size x size;
  * video: one `<|image|>` per sampled frame (241101 wraps them in `<|start_video_frame|>`..
    `<|end_video_frame|>`), never cut. A video is a file (only probed here: the frame count comes from the
    headers; frames decode later, in the encoder), a list of PIL frames, or pixel values [F, 3, S, S].
Each image is expanded with *its own* grid. The official 240728 processor indexes its per-crop shape
list by image number, so every image after the first gets a wrong template and the token count stops
matching the pixel count (spec section 4); we deliberately do not reproduce that bug. The invariant
"number of `<|image|>` tokens == number of planned image tensors" is checked on every call.

Tokenisation splits the rendered prompt on `<|image|>`, encodes each text chunk separately (as the
official processor does) and inserts the image token id between chunks, recording each image token's
index (`image_positions`), which is all the model needs to place images (240728 media_offset and the
241101 start list are both derived from it). `collate` left-pads a batch and shifts those positions.
With `answer_ids` (a server's own earlier answers, plan.py's note) the ChatML text is cut around each such
answer (`chatml_pieces`) and the given ids stand in for its text.
The shared planning (items, hashing, pixels on request) is in plan.py; this file holds what is Owl3's.

The caller's messages are never mutated; all expansion happens on copies of the strings.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

from hyperowl.errors import InputError
from hyperowl.processing.chat import (
    END_CUT,
    END_VIDEO_FRAME,
    IMAGE_TOKEN,
    START_CUT,
    START_VIDEO_FRAME,
    chatml_pieces,
    chatml_segments,
    render_chatml,
)
from hyperowl.processing.images import cut_image, cut_prompt, image_to_tensor, images_to_tensor, select_grid
from hyperowl.processing.plan import MediaItem, PlannerBase, ProcessedInputs

logger = logging.getLogger(__name__)

VARIANTS = ("240728", "241101")
_CUT_TEMPLATE = {"240728": "v2_global", "241101": "v3_global"}

__all__ = ["Owl3Processor", "ProcessedInputs", "BatchInputs", "collate", "VARIANTS"]


@dataclass
class BatchInputs:
    """A left-padded batch of prompts."""

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]: 1 for real tokens, 0 for padding
    pixel_values: Optional[torch.Tensor]  # float32 [N_total, 3, S, S], rows' images in row order, or None
    image_positions: torch.Tensor  # int64 [B, N_max]: token index in the padded row, -1 where absent
    image_counts: torch.Tensor  # int64 [B]: images per row


class Owl3Processor(PlannerBase):
    """Prompt planning + pixel preprocessing for mPLUG-Owl3 (variants "240728" and "241101")."""

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
        return cls(load_tokenizer(path), variant=variant, image_size=image_size, cut=cut)

    @property
    def recipe(self) -> str:
        return f"owl3-{self.variant}/{self.image_size}"

    # -- text pieces -------------------------------------------------------------------------------------
    def _image_item(self, item: MediaItem, cut: bool) -> str:
        if not cut:
            return IMAGE_TOKEN
        rows, cols = select_grid(item.image.width, item.image.height, self.image_size)
        item.grid, item.count = (rows, cols), rows * cols + 1
        return cut_prompt(rows, cols, _CUT_TEMPLATE[self.variant], IMAGE_TOKEN)

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

    def _render_and_tokenize(self, messages: list[dict[str, str]], system: Optional[str],
                             add_generation_prompt: bool, answer_ids: Optional[Mapping[int, Sequence[int]]] = None
                             ) -> tuple[list[int], list[int], str]:
        kwargs = {} if system is None else {"system": system}
        if not answer_ids:
            prompt = render_chatml(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            ids, positions = self._tokenize(prompt)
            return ids, positions, prompt
        # Exact answer ids (plan.py's note): the text between two given answers is tokenized as one piece, so
        # the piece before an answer is tokenized exactly as that turn's prompt was.
        ids, positions, text, pending = [], [], [], []
        for piece, index in chatml_pieces(messages, add_generation_prompt=add_generation_prompt, **kwargs):
            text.append(piece)
            if index is None or index not in answer_ids:
                pending.append(piece)
                continue
            seg_ids, seg_pos = self._tokenize("".join(pending))
            positions += [len(ids) + p for p in seg_pos]
            ids += seg_ids + [int(t) for t in answer_ids[index]]
            pending = []
        seg_ids, seg_pos = self._tokenize("".join(pending))
        positions += [len(ids) + p for p in seg_pos]
        return ids + seg_ids, positions, "".join(text)

    def _training_ids(self, messages: list[dict[str, str]], system: Optional[str]
                      ) -> tuple[list[int], list[int], list[int], str]:
        """Tokenized per ChatML segment, as the prompt is at inference; labels on assistant answers and their
        <|im_end|>, -100 elsewhere."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for text, trainable in chatml_segments(messages, **({} if system is None else {"system": system})):
            seg_ids, seg_pos = self._tokenize(text)
            positions += [len(ids) + p for p in seg_pos]
            ids += seg_ids
            labels += seg_ids if trainable else [-100] * len(seg_ids)
        return ids, positions, labels, ""

    # -- pixels ------------------------------------------------------------------------------------------
    def image_pixels(self, item: MediaItem) -> torch.Tensor:
        if item.grid is None:
            return image_to_tensor(item.image, self.image_size).unsqueeze(0)
        return cut_image(item.image, self.image_size)[0]

    def frame_pixels(self, frames: Iterable[Image.Image], count: int) -> torch.Tensor:
        return images_to_tensor(frames, self.image_size, count)


def load_tokenizer(path: "str | os.PathLike[str]") -> Tokenizer:
    """`tokenizer.json` of a checkpoint directory, with a clear error when it is missing or broken."""
    tok_path = Path(path) / "tokenizer.json"
    if not tok_path.is_file():
        raise InputError(
            f"checkpoint '{path}': tokenizer.json not found; pass a checkpoint directory that contains tokenizer.json"
        )
    try:
        return Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise InputError(f"tokenizer '{tok_path}': cannot be loaded ({exc}); re-download the checkpoint's tokenizer.json") from None


def collate(batch: Sequence[ProcessedInputs], pad_id: int) -> BatchInputs:
    """Left-pad a list of `ProcessedInputs` into one batch (image positions shifted by each row's padding).

    Also takes any object with `input_ids` and `image_positions` (None = no images), such as the engine's
    requests, whose images come as features: rows without `pixel_values` contribute no pixels.
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
        px = getattr(b, "pixel_values", None)  # engine requests carry features, not pixels
        if px is not None:
            if px.shape[0] != counts[r]:
                raise InputError(f"batch row {r}: {px.shape[0]} pixel tensors for {counts[r]} image positions")
            pixels.append(px)
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
