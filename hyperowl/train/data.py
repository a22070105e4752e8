"""Training data: JSONL conversations with images/videos, checked line by line, batched with labels.

Format (one JSON object per line; the ms-swift / LLaVA style):

    {"messages": [{"role": "user", "content": "<|image|>What colour is the circle?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/0001.png"], "videos": []}

Paths are relative to the JSONL file's folder (or absolute). Each `<|image|>` / `<|video|>` placeholder
consumes the next image / video.

The layouts other tools write are read as they are (`to_record` maps them onto the form above):
  * LLaVA / ShareGPT: {"id", "image": path | [paths], "video"?, "conversations": [{"from": "human"|"gpt"|
    "system", "value": "<image>\n..."}]} (llava_v1_5_mix665k.json is a JSON list of these);
  * ms-swift: {"messages": [...], "images": [paths | {"path"}], "videos"?} and its older
    {"system"?, "query", "response", "history"?: [[query, response], ...], "images"?}.
`<image>` / `<video>` tags become our placeholders; a LLaVA or query/response conversation with images but no
tag gets them in front of its first user message (what their loaders do; in the messages form a count that
does not match stays an error). Any record file `data.tables`
reads works: JSONL, a JSON list, Parquet, a `datasets` folder. Loss is taken only on assistant answers (and their `<|im_end|>`; for
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

from ..data.tables import exists, is_hub_id, iter_rows
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


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAGS = (("<image>", IMAGE_TOKEN, "images"), ("<video>", VIDEO_TOKEN, "videos"))


def _media_list(value: Any, kind: str) -> list:
    """A path, a list of paths, or ms-swift's {"path": ...} entries, as a list of paths."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise ValueError(f"'{kind}' must be a list of paths")
    out = []
    for x in items:
        if isinstance(x, dict) and isinstance(x.get("path"), str):
            x = x["path"]
        if not isinstance(x, str):
            raise ValueError(f"'{kind}' must be a list of paths (embedded bytes are not read for training)")
        out.append(x)
    return out


def to_record(rec: Any) -> dict:
    """Our record form ({messages, images, videos}) from ours, LLaVA's or ms-swift's (module note)."""
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    prepend = True  # media without tags go in front of the first user message (LLaVA, swift query form)
    if "messages" in rec:  # ours and ms-swift's: a placeholder count that does not match is an error
        messages, images, videos, prepend = rec["messages"], rec.get("images"), rec.get("videos"), False
    elif "conversations" in rec:  # LLaVA / ShareGPT
        turns = rec["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
            raise ValueError("'conversations' must be a list of {\"from\", \"value\"} objects")
        messages = []
        for i, t in enumerate(turns):
            role = _ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise ValueError(f"conversations[{i}]: 'from' {t.get('from')!r} is not human, gpt or system")
            messages.append({"role": role, "content": t["value"]})
        images = rec.get("image", rec.get("images"))
        videos = rec.get("video", rec.get("videos"))
    elif "query" in rec and "response" in rec:  # ms-swift's query / response / history
        messages = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        history = rec.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise ValueError("'history' must be a list of [query, response] pairs")
        for q, a in [*history, (rec["query"], rec["response"])]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        images, videos = rec.get("images"), rec.get("videos")
    else:
        raise ValueError("missing 'messages' (or LLaVA's 'conversations', or ms-swift's 'query' and 'response')")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list of {\"role\", \"content\"} objects")
    media = {"images": _media_list(images, "images"), "videos": _media_list(videos, "videos")}
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    for tag, token, kind in _TAGS:
        n = 0
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                m["content"] = m["content"].replace(tag, token)
                n += m["content"].count(token)
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        if prepend and n == 0 and media[kind] and first_user is not None and isinstance(first_user.get("content"), str):
            first_user["content"] = token * len(media[kind]) + first_user["content"]
    return {"messages": messages, **media}


def _check_record(rec: Any, root: Path, verify_media: bool) -> dict:
    rec = to_record(rec)
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
    if not exists(p):
        raise InputError(f"training data '{path}': no such file")
    if is_hub_id(p):  # a hub dataset (hf:NAME[:SPLIT]): read through the datasets library, its own cache
        key = (str(path), 0, 0, on_error, verify_media)
    else:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, on_error, verify_media)
    if checked is not None and key in checked:
        return checked[key]
    records: list[dict] = []
    bad: list[tuple[int, str]] = []

    def check(n: int, where: str, rec: Any) -> None:
        try:
            records.append(_check_record(rec, root, verify_media))
        except (ValueError, InputError) as e:
            msg = f"{where}: {e}"
            if on_error == "fail":
                raise InputError(f"{msg} (fix the record, or set data.on_error: skip)") from None
            log.warning("skipping %s", msg)
            bad.append((n, str(e)))

    root = p if p.is_dir() else p.parent
    if p.is_file() and p.suffix.lower() == ".jsonl":  # line by line: a line that is not JSON can be skipped
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    msg = f"{p}:{n}: not valid JSON ({e})"
                    if on_error == "fail":
                        raise InputError(f"{msg} (fix the line, or set data.on_error: skip)") from None
                    log.warning("skipping %s", msg)
                    bad.append((n, str(e)))
                    continue
                check(n, f"{p}:{n}", rec)
    else:  # JSON list (LLaVA's), Parquet, a datasets folder: record n is row n (1-based)
        for n, (where, rec) in enumerate(iter_rows(p, "training data"), 1):
            check(n, where, rec)
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
