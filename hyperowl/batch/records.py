"""Batch input: record rows -> checked `Record`s -> planned prompts with their media decoded (no model).

Design note: rows come from `hyperowl.data.tables.iter_rows` (JSONL or Parquet, the training/eval record
form: `id`, `messages` with `<|image|>`/`<|video|>` placeholders, `images`, `videos`). A batch job must not
stop at one bad row, so every per-record fault becomes that record's `error` (the InputError message the
CLI prints for the same input) and a `reason` for the summary; a record that cannot be answered never
raises. Media paths are resolved against the input file's folder; http(s) URLs are downloaded to a
temporary file only while the record is planned and decoded. Error messages name the media as the row
gave it (the relative path or the URL), not the resolved file. A trailing assistant message (the reference
answer of a training or eval record) is dropped: the last user message is the one answered.

`prepare` is the CPU half of answering a record (plan + decode + preprocess); the model half is in
`hyperowl.batch.runner.answer`. The local loop, the torchrun ranks and Ray's CPU tasks all call it, so a
record gives the same token ids and pixels on every path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import InputError
from ..data.tables import iter_rows

log = logging.getLogger(__name__)

MAX_URL_BYTES = 512 * 2**20  # one downloaded image or video
URL_TIMEOUT_S = 30.0


@dataclass
class Record:
    """One input row, checked. `error` set: not answerable (the row is written with it)."""

    index: int  # the row's ordinal in the input (0-based); a row without `id` is called str(index)
    id: str
    where: str  # "file:line" / "file#row i", for logs
    messages: Any = None
    images: list[str] = field(default_factory=list)  # as resolved: local paths or URLs
    videos: list[str] = field(default_factory=list)
    given: dict[str, str] = field(default_factory=dict)  # resolved path -> as the row gave it (error messages)
    error: Optional[str] = None
    reason: Optional[str] = None

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "where": self.where, "messages": self.messages,
                "images": self.images, "videos": self.videos, "given": self.given}


def reason_of(message: str) -> str:
    """The summary's failure class of an error message."""
    m = message.lower()
    if "placeholder" in m:
        return "placeholder mismatch"
    if "appears twice" in m:
        return "duplicate id"
    if m.startswith(("image '", "video '")) or "url" in m and ("image" in m or "video" in m):
        if "not found" in m or "no such file" in m or "cannot fetch" in m:
            return "missing media"
        return "unreadable media"
    if "not valid json" in m or "must be a json object" in m or m.startswith("record"):
        return "bad record"
    if m.startswith("messages"):
        return "bad record"
    return "other"


def failed(rec: Record, message: str) -> Record:
    rec.error, rec.reason = message, reason_of(message)
    return rec


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def check_record(index: int, where: str, row: Any, root: Path) -> Record:
    """A row -> Record (with `error` set when the row itself is malformed)."""
    if isinstance(row, InputError):  # a line that is not a JSON object (tables.iter_rows keep_bad)
        return failed(Record(index, str(index), where), str(row))
    rid = row.get("id")
    rec = Record(index, str(index) if rid is None else str(rid), where)
    if "messages" not in row or row["messages"] is None:
        return failed(rec, f"record '{rec.id}' ({where}): no 'messages'; give a list of "
                           "{'role': ..., 'content': ...} messages")
    msgs = row["messages"]
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]  # a training/eval record's reference answer: the last user message is answered
    rec.messages = msgs
    for kind in ("images", "videos"):
        paths = row.get(kind)
        paths = [] if paths is None else paths
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            return failed(rec, f"record '{rec.id}' ({where}): '{kind}' must be a list of paths or URLs")
        resolved = []
        for p in paths:
            r = p if _is_url(p) or Path(p).is_absolute() else str(root / p)
            rec.given[r] = p
            resolved.append(r)
        setattr(rec, kind, resolved)
    return rec


def read_records(path: str | Path, skip: Callable[[str], bool] = lambda _id: False) -> Iterator[Record]:
    """The input's records in order, except those `skip(id)` says are done. A repeated id is a failed
    record ("appears twice"), whatever the first one's fate."""
    root = Path(path).parent
    first: dict[str, str] = {}
    for index, (where, row) in enumerate(iter_rows(path, "batch input", keep_bad=True)):
        rec = check_record(index, where, row, root)
        if rec.id in first:
            yield failed(rec, f"record id '{rec.id}' ({where}) appears twice in the input (first at {first[rec.id]}); "
                              "ids must be unique (the output has one row per id)")
            continue
        first[rec.id] = where
        if not skip(rec.id):
            yield rec


def _download(url: str, kind: str, folder: Path) -> Path:
    suffix = Path(url.split("?", 1)[0]).suffix[:8]
    dest = folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + suffix)
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r, dest.open("wb") as f:
            n = 0
            while chunk := r.read(1 << 20):
                n += len(chunk)
                if n > MAX_URL_BYTES:
                    raise InputError(f"{kind} '{url}': larger than {MAX_URL_BYTES >> 20} MiB; download it and "
                                     "give the local path")
                f.write(chunk)
    except urllib.error.HTTPError as e:
        raise InputError(f"{kind} '{url}': cannot fetch the URL (HTTP {e.code}); check the URL") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        raise InputError(f"{kind} '{url}': cannot fetch the URL ({why}); check the URL") from None
    return dest


@contextlib.contextmanager
def local_media(rec: Record) -> Iterator[tuple[list[str], list[str]]]:
    """(images, videos) as local files: URLs downloaded into a temporary folder removed on exit."""
    if not any(_is_url(p) for p in rec.images + rec.videos):
        yield rec.images, rec.videos
        return
    folder = Path(tempfile.mkdtemp(prefix="hyperowl-batch-"))
    try:
        def fetch(paths: list[str], kind: str) -> list[str]:
            out = []
            for p in paths:
                if _is_url(p):
                    local = str(_download(p, kind, folder))
                    rec.given[local] = p
                    p = local
                out.append(p)
            return out

        yield fetch(rec.images, "image"), fetch(rec.videos, "video")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_given(rec: Record, message: str) -> str:
    """An error message naming the media as the row gave them (longest resolved path first)."""
    for resolved in sorted(rec.given, key=len, reverse=True):
        if resolved != rec.given[resolved]:
            message = message.replace(resolved, rec.given[resolved])
    return message


def prepare(proc: Any, rec: Record, media: dict, decode: Callable[[Any], Any]) -> tuple[Any, Any]:
    """(plan, decode(plan)) of a record: its prompt planned with the media options (max_frames, fps, cut,
    system) and its media made ready by `decode` while downloaded files still exist. An InputError names
    the media as the row gave them."""
    try:
        with local_media(rec) as (images, videos):
            plan = proc.plan(rec.messages, images=images, videos=videos, **media)
            return plan, decode(plan)
    except InputError as e:
        raise InputError(as_given(rec, str(e))) from None


def load_processor(model: str | os.PathLike | None) -> Any:
    """The processor of a checkpoint without loading its weights (Ray's CPU tasks plan prompts with it)."""
    import hyperowl
    from ..checkpoint import read_config, resolve, safetensors_files, shard_keys
    from ..families import family_for_checkpoint
    from ..processing.processor import load_tokenizer

    d = resolve(model if model is not None else hyperowl.default_model_dir())
    raw = read_config(d)
    family = family_for_checkpoint(raw, shard_keys(safetensors_files(d)), where=str(d / "config.json"))
    cfg = family.config_from_hf(raw, where=str(d / "config.json"))
    if not (d / "tokenizer.json").exists():
        raise InputError(f"model '{d}': no tokenizer.json in the checkpoint; batch needs one")
    return family.processor(load_tokenizer(d), cfg)
