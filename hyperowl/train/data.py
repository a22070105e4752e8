"""Training data: JSONL conversations with images/videos, checked line by line, batched with labels.

Format (one JSON object per line; the ms-swift / LLaVA style):

    {"messages": [{"role": "user", "content": "<|image|>What colour is the circle?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/0001.png"], "videos": []}

Paths are relative to the JSONL file's folder (or absolute). Each `<|image|>` / `<|video|>` placeholder
consumes the next image / video. Loss is taken only on assistant answers (and their `<|im_end|>`; for
mPLUG-Owl2 their `</s>`): the processor's `training_example` (Owl3Processor or Owl2Processor) decides.

Design note: every line is validated when the dataset is opened (JSON, message structure, placeholder
counts, files present and decodable), so a bad line is reported with its number before training starts:
`on_error="fail"` stops there, `"skip"` logs it and leaves it out. Batches come from a seeded global
order (epoch-wise permutations), so a resumed or multi-process run sees exactly the same examples.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import InputError
from ..processing.chat import IMAGE_TOKEN, VIDEO_TOKEN, normalize_messages
from ..processing.processor import Owl3Processor, collate

log = logging.getLogger(__name__)


@dataclass
class TrainExample:
    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], -100 = no loss
    pixel_values: torch.Tensor | None
    image_positions: torch.Tensor


def _check_record(rec: Any, root: Path, verify_media: bool) -> dict:
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    unknown = set(rec) - {"messages", "images", "videos", "id", "task", "answer", "meta"}
    if "messages" not in rec:
        raise ValueError("missing 'messages'")
    if unknown:
        log.debug("ignoring fields %s", sorted(unknown))
    pairs = normalize_messages(rec["messages"])
    if not any(role == "assistant" for role, _ in pairs):
        raise ValueError("no assistant message: nothing to learn from")
    media = {}
    for kind, token in (("images", IMAGE_TOKEN), ("videos", VIDEO_TOKEN)):
        paths = rec.get(kind) or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"'{kind}' must be a list of paths")
        n = sum(c.count(token) for _, c in pairs)
        if n != len(paths):
            raise ValueError(f"{n} {token} placeholder(s) but {len(paths)} {kind}")
        resolved = [p if Path(p).is_absolute() else str(root / p) for p in paths]
        for p in resolved:
            if not Path(p).is_file():
                raise ValueError(f"{kind[:-1]} '{p}' not found")
            if verify_media and kind == "images":
                try:
                    with Image.open(p) as im:
                        im.verify()
                except Exception as e:
                    raise ValueError(f"image '{p}' cannot be decoded ({type(e).__name__})") from None
        media[kind] = resolved
    return {"messages": rec["messages"], **media}


def read_records(path: str | Path, on_error: str = "fail", verify_media: bool = True,
                 checked: dict | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """Read and check a training JSONL: (records, bad lines as (line number, why)). A bad line fails with
    `file:line: why` (on_error fail) or is skipped and logged (skip). checked: a dict shared by the reads of
    one process (a phased recipe's phases): a file read before and unchanged since (same size and mtime) is
    not read and verified again. Records do not depend on a processor."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"training data '{path}': no such file")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, on_error, verify_media)
    if checked is not None and key in checked:
        return checked[key]
    records: list[dict] = []
    bad: list[tuple[int, str]] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(_check_record(json.loads(line), p.parent, verify_media))
            except (ValueError, InputError) as e:
                msg = f"{p}:{n}: {e}"
                if on_error == "fail":
                    raise InputError(f"{msg} (fix the line, or set data.on_error: skip)") from None
                log.warning("skipping %s", msg)
                bad.append((n, str(e)))
    if bad:
        log.warning("%s: skipped %d bad line(s) of %d", p, len(bad), len(bad) + len(records))
    if not records:
        raise InputError(f"training data '{path}': no usable examples")
    if checked is not None:
        checked[key] = (records, bad)
    return records, bad


class ConversationDataset:
    def __init__(self, path: str | Path, processor: Owl3Processor | Any, on_error: str = "fail", max_frames: int = 8,
                 cut: bool = False, max_length: int = 4096, verify_media: bool = True, rows_per_image: int = 1,
                 checked: dict | None = None) -> None:
        """checked: see `read_records` (a phased recipe checks each data file once for all its phases)."""
        self.path = Path(path)
        self.processor, self.max_frames, self.cut, self.max_length = processor, max_frames, cut, max_length
        self.rows_per_image = rows_per_image  # sequence rows each image takes in the LLM (Owl2: Q + 1; Owl3: 1)
        self.records, self.bad = read_records(path, on_error, verify_media, checked)

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> tuple[int, ...]:
        """Each conversation's `conversation_length` (for `data.group_by_length`)."""
        return tuple(conversation_length(rec["messages"]) for rec in self.records)

    def __getitem__(self, i: int) -> TrainExample:
        rec = self.records[i]
        inputs, labels = self.processor.training_example(rec["messages"], images=rec["images"], videos=rec["videos"],
                                                         max_frames=self.max_frames, cut=self.cut)
        n = len(labels) + inputs.num_images * (self.rows_per_image - 1)
        if n > self.max_length:
            raise InputError(f"{self.path}: example {i} has {n} tokens > data.max_length {self.max_length}")
        return TrainExample(inputs.input_ids, labels, inputs.pixel_values, inputs.image_positions)


def collate_train(examples: list[TrainExample], pad_id: int = 0) -> dict[str, torch.Tensor | None]:
    """Left-padded batch: input_ids, attention_mask, labels (-100 on padding), pixel_values, image_positions."""
    batch = collate(examples, pad_id=pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    for r, ex in enumerate(examples):
        labels[r, labels.shape[1] - len(ex.labels):] = ex.labels
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels,
            "pixel_values": batch.pixel_values,
            "image_positions": batch.image_positions if int(batch.image_counts.sum()) else None}


def conversation_length(messages: list[dict]) -> int:
    """Characters of a conversation's messages: a cheap proxy of its token length (what grouping sorts by)."""
    return sum(len(m["content"]) for m in messages)


@functools.lru_cache(maxsize=4)
def global_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@functools.lru_cache(maxsize=4)
def grouped_order(n: int, seed: int, epoch: int, lengths: tuple[int, ...], window: int, block: int) -> tuple[int, ...]:
    """The epoch's order with every `window` consecutive examples sorted by length, cut into blocks of `block`
    (one optimizer step) and the blocks shuffled inside their window.

    Why: a batch is padded to its longest conversation; drawn at random, a few long ones (several images
    shown one per turn) make every batch long. Sorting inside windows of many batches keeps the data random
    at the scale of an epoch while the rows of one step have similar lengths.
    """
    order = global_order(n, seed, epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    out: list[int] = []
    for w in range(0, n, window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])  # stable: ties keep the random order
        blocks = [chunk[b : b + block] for b in range(0, len(chunk), block)]
        out += [i for j in torch.randperm(len(blocks), generator=g).tolist() for i in blocks[j]]
    return tuple(out)


def batch_indices(n: int, seed: int, step: int, micro: int, batch_size: int, grad_accum: int, rank: int, world: int,
                  lengths: tuple[int, ...] | None = None, group: int = 0) -> list[int]:
    """Indices of the examples for (optimizer step, micro-batch, rank): a pure function of the position.

    group > 0 (with `lengths`, one per example): sort windows of `group` optimizer steps by length
    (`grouped_order`)."""
    per_step = batch_size * grad_accum
    start = step * per_step + micro * batch_size
    per_rank = batch_size // world
    js = range(start + rank * per_rank, start + (rank + 1) * per_rank)

    def order(epoch: int) -> Sequence[int]:
        if group > 0 and lengths is not None:
            return grouped_order(n, seed, epoch, lengths, group * per_step, per_step)
        return global_order(n, seed, epoch)

    orders = {e: order(e) for e in {j // n for j in js}}  # once per epoch: the cache key hashes `lengths`
    return [orders[j // n][j % n] for j in js]


class StepBatches(torch.utils.data.Dataset):
    """The training micro-batches from optimizer step `start` on, in order, as a dataset for a DataLoader.

    Item k is micro-batch k % grad_accum of step start + k // grad_accum for this rank (`batch_indices`), read
    and collated (`collate_train`). Each batch is a pure function of its position, so worker processes can
    prepare the next ones while the model trains, and a resumed run reads exactly what an uninterrupted one
    would. A bad example (InputError) comes back as {"error": message}: the training loop raises it, with the
    message and not a worker traceback.
    """

    def __init__(self, data: ConversationDataset, start: int, total: int, seed: int, batch_size: int, grad_accum: int,
                 rank: int, world: int, lengths: tuple[int, ...] | None, group: int, pad_id: int) -> None:
        self.data, self.start, self.steps = data, start, max(0, total - start)
        self.seed, self.batch_size, self.grad_accum, self.rank, self.world = seed, batch_size, grad_accum, rank, world
        self.lengths, self.group, self.pad_id = lengths, group, pad_id

    def __len__(self) -> int:
        return self.steps * self.grad_accum

    def __getitem__(self, k: int) -> dict:
        step, micro = divmod(k, self.grad_accum)
        idx = batch_indices(len(self.data), self.seed, self.start + step, micro, self.batch_size, self.grad_accum,
                            self.rank, self.world, self.lengths, self.group)
        try:
            return collate_train([self.data[i] for i in idx], self.pad_id)
        except InputError as e:
            return {"error": str(e)}


def step_loader(batches: StepBatches, workers: int) -> torch.utils.data.DataLoader:
    """Iterate `batches` in order; workers > 0 prepare the next micro-batches in that many processes."""
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used in forked workers
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                       prefetch_factor=4 if workers > 0 else None)
