"""Batch output: rows {id, answer, usage, error} appended durably, resumed by id, never written twice.

Design note: every writer appends to a JSONL *journal*, one `write` + flush + fsync per small batch of
rows, so after a kill at any moment the file holds whole rows and at most one torn last line (no newline
yet). Opening a journal cuts that torn tail off before appending (the row is simply answered again), and
the ids already present are skipped by the next run, so an id reaches the output once.

  * OUTPUT.jsonl, one process: OUTPUT itself is the journal.
  * OUTPUT.parquet (Parquet cannot be appended to): rows go to `OUTPUT.partial.jsonl`; at the end the
    Parquet file is rewritten (old rows + journal, by id) to a temporary name and renamed over OUTPUT,
    then the journal is removed. A kill between the two leaves rows in both: ids are merged, not repeated.
  * torchrun: rank r journals to `OUTPUT.rank<r>.partial.jsonl`; rank 0 merges them into OUTPUT the same
    way after a barrier.
The ids done = ids in OUTPUT and in every journal beside it, so a resume with another world size (or after
a kill during a merge) still skips them.

Resuming trusts the rows on disk, so they must come from the same job: `OUTPUT.run.json` records the model
(a fingerprint of its checkpoint files: config, sizes, safetensors headers and first bytes, so a model
retrained into the same folder differs), the input's file name and the media and sampling options; a run
with another one is refused (`hyperowl eval` learnt this the hard way: a retrained model "resumed" its
predecessor's predictions).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import InputError

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def check_output_path(out: str | Path) -> Path:
    p = Path(out)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out '{out}': unknown output type '{p.suffix}'; give a .jsonl or .parquet file name")
    if p.is_dir():
        raise InputError(f"--out '{out}': is a directory; give a .jsonl or .parquet file name")
    if not p.parent.is_dir():
        raise InputError(f"--out '{out}': the folder '{p.parent}' does not exist")
    return p


def is_parquet(out: Path) -> bool:
    return out.suffix.lower() == ".parquet"


def journal_path(out: Path, rank: int | None = None) -> Path:
    """Where this process appends: OUTPUT (JSONL, one process) or a journal beside it."""
    if rank is None:
        return out.with_name(out.name + ".partial.jsonl") if is_parquet(out) else out
    return out.with_name(f"{out.name}.rank{rank}.partial.jsonl")


def journals(out: Path) -> list[Path]:
    """Every journal beside OUTPUT (of any rank, of an earlier run)."""
    return sorted(p for p in out.parent.glob(f"{out.name}*.partial.jsonl") if p.name != out.name)


def checkpoint_fingerprint(d: Path) -> str:
    """A cheap identity of a checkpoint folder's weights and config: each safetensors file's size, header and
    64 samples of 4 KiB spread over its data (a fine-tune that leaves the first tensors frozen still differs)."""
    import hashlib

    from ..checkpoint import safetensors_files

    h = hashlib.sha1((d / "config.json").read_bytes())
    for f in safetensors_files(d):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")  # safetensors: header length, header, then the data
            h.update(fh.read(min(n, 2**24)))
            start = 8 + n
            for i in range(64):
                fh.seek(start + (size - start) * i // 64)
                h.update(fh.read(4096))
    return h.hexdigest()[:16]


def check_run(out: Path, key: dict, write: bool = True) -> None:
    """Refuse to resume OUTPUT with another model, input or options (see the module note); record the key."""
    f = out.with_name(out.name + ".run.json")
    if f.exists():
        old = json.loads(f.read_text())
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise InputError(f"--out '{out}' holds answers of another job (different {', '.join(diff)}); choose "
                             f"another --out, or delete it and {f.name} to start over")
    elif write:
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(key, indent=1))
        os.replace(tmp, f)


def _complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The whole lines of a journal and the byte length they span (a torn tail after it is ignored)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: a torn last line (%d bytes, an interrupted run) is ignored; its row is answered again",
                    path, len(data) - end)
    return data[:end].splitlines(), end


def read_journal(path: Path) -> Iterator[dict]:
    if not path.exists():
        return
    lines, _ = _complete_lines(path)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["id"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: not a batch output row; remove the file or choose another --out") from None
        yield row


def read_output(out: Path) -> Iterator[dict]:
    """Rows of OUTPUT itself (JSONL journal, or a finished Parquet file)."""
    if not out.exists():
        return
    if is_parquet(out):
        from ..data.tables import iter_rows

        for where, row in iter_rows(out, "batch output"):
            if "id" not in row:
                raise InputError(f"{where}: not a batch output row; remove the file or choose another --out")
            yield row
    else:
        yield from read_journal(out)


def done_ids(out: Path) -> set[str]:
    ids = {str(r["id"]) for r in read_output(out)}
    for j in journals(out):
        ids |= {str(r["id"]) for r in read_journal(j)}
    return ids


class Journal:
    """Durable appends of rows to one JSONL file (see the module note)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            _, end = _complete_lines(path)
            if end < path.stat().st_size:
                os.truncate(path, end)
        self.f = path.open("ab")

    def write(self, rows: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        if data:
            self.f.write(data)  # one write per batch: a kill leaves whole rows and at most one torn line
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def finalize(out: Path) -> None:
    """Fold every journal beside OUTPUT into it (ids merged, never repeated), then remove the journals."""
    parts = journals(out)
    if is_parquet(out):
        if not parts and out.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows: dict[str, dict] = {}
        for r in read_output(out):
            rows.setdefault(str(r["id"]), r)
        for j in parts:
            for r in read_journal(j):
                rows.setdefault(str(r["id"]), r)
        table = pa.Table.from_pylist([_parquet_row(r) for r in rows.values()], schema=_parquet_schema())
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    elif parts:
        seen = {str(r["id"]) for r in read_output(out)}
        j = Journal(out)
        for part in parts:
            new = []
            for r in read_journal(part):
                if str(r["id"]) not in seen:
                    seen.add(str(r["id"]))
                    new.append(r)
            j.write(new)
        j.close()
    for part in parts:
        part.unlink()


def _parquet_schema():
    import pyarrow as pa

    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
                       ("image_tensors", pa.int64()), ("visual_tokens", pa.int64()),
                       ("cached_visual_tokens", pa.int64())])
    return pa.schema([("id", pa.string()), ("answer", pa.string()), ("usage", usage), ("error", pa.string())])


def _parquet_row(r: dict) -> dict:
    return {"id": str(r["id"]), "answer": r.get("answer"), "usage": r.get("usage"), "error": r.get("error")}
