"""Record files, read one way for training, evaluation and batch inference.

A record file is a table of JSON-like rows: `.jsonl` (one object a line), `.json` (a list, or an object
holding exactly one list, e.g. {"data": [...]}), or `.parquet` (pyarrow, the `data` extra). A folder is a
Hugging Face `datasets` table: one written by `Dataset.save_to_disk` (Arrow stream files listed in its
state.json; of a DatasetDict, give the split's folder) or a downloaded hub snapshot of Parquet shards (every
*.parquet under it, in name order). `hf:NAME[:SPLIT]` reads a hub dataset through the `datasets` library
(the `hf` extra; imported only then). Cells stay as stored: an Image column is a {"bytes", "path"} struct,
never decoded here. Readers stream rows as `(where, row)` pairs, where `where` names the row for error
messages ("file:line", "file[i]", "file#row i"), so the format-specific code above this (training conversations, benchmark layouts, batch
jobs) never parses a file itself and every error points at the row a user can find.

Why not pandas: rows stay plain dicts (nested lists/structs included), and a Parquet file of millions of
rows streams in record batches instead of being loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'hyperowl[data]' (or pip install pyarrow)") from None
    return pq


HUB_PREFIX = "hf:"


def is_hub_id(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def exists(path: str | Path) -> bool:
    """A record source that can be read: a file, a folder, or a hub id (checked when read)."""
    return is_hub_id(path) or Path(path).exists()


def iter_rows(path: str | Path, what: str = "data", keep_bad: bool = False) -> Iterator[tuple[str, Any]]:
    """Stream `(where, row)` pairs from a .jsonl / .json / .parquet file, a `datasets` folder or a hub id
    (see the module note). `what` names the file's role in errors ("eval data", "training data", "batch
    input"). A row that is not an object is an InputError.
    keep_bad: a .jsonl line that is not a JSON object is yielded as `(where, InputError)` and reading goes on
    (a batch job records the error and answers the other rows); other errors (no file, not UTF-8) still raise."""
    if is_hub_id(path):
        yield from _hub_rows(str(path), what)
        return
    p = Path(path)
    if p.is_dir():
        yield from _folder_rows(p, what)
        return
    if not p.is_file():
        raise InputError(f"{what} '{path}': no such file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(p, what)
    elif suffix == ".jsonl":
        yield from _jsonl_rows(p, keep_bad)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{p}: not UTF-8 text; give a JSON list of records, or a .parquet file") from None
        except ValueError as e:
            raise InputError(f"{p}: not valid JSON ({e}); give a JSON list of records or a .jsonl file") from None
        yield from json_rows(p, data)
    else:
        raise InputError(f"{what} '{path}': unknown file type '{p.suffix}'; give one of {', '.join(TABLE_SUFFIXES)}")


def _jsonl_rows(p: Path, keep_bad: bool) -> Iterator[tuple[str, Any]]:
    with p.open(encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise InputError(f"{p}:{n}: not valid JSON ({e}); one JSON object per line") from None
                    checked = _check_row(f"{p}:{n}", row)
                except InputError as e:
                    if not keep_bad:
                        raise
                    checked = (f"{p}:{n}", e)
                yield checked
        except UnicodeDecodeError:
            raise InputError(f"{p}: not UTF-8 text; give a .jsonl file of JSON objects, or a .parquet file") from None


def read_rows(path: str | Path, what: str = "data") -> list[tuple[str, dict]]:
    """All `(where, row)` pairs of a record file (see `iter_rows`)."""
    return list(iter_rows(path, what))


def json_rows(path: Path, data: Any) -> list[tuple[str, dict]]:
    """`(where, row)` pairs from an already parsed .json document: a list, or an object holding one list."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: a JSON object must hold exactly one list of records (e.g. {{\"data\": [...]}})")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    return [_check_row(f"{path}[{i}]", r) for i, r in enumerate(data)]


def count_rows(path: str | Path, what: str = "data", keep_bad: bool = False) -> int:
    """Number of rows, cheaply where the format allows (Parquet metadata); for progress bars."""
    if is_hub_id(path) or Path(path).is_dir():
        return sum(1 for _ in iter_rows(path, what))
    p = Path(path)
    if p.suffix.lower() == ".parquet" and p.is_file():
        try:
            return _pyarrow_parquet().ParquetFile(p).metadata.num_rows
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{what} '{p}': not a readable Parquet file ({e})") from None
    return sum(1 for _ in iter_rows(p, what, keep_bad))


def _parquet_rows(p: Path, what: str) -> Iterator[tuple[str, dict]]:
    pq = _pyarrow_parquet()
    try:
        f = pq.ParquetFile(p)
    except Exception as e:
        raise InputError(f"{what} '{p}': not a readable Parquet file ({e})") from None
    i = 0
    for batch in f.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{p}#row {i}", row
            i += 1


def _folder_rows(p: Path, what: str) -> Iterator[tuple[str, dict]]:
    state = p / "state.json"
    if state.is_file():  # Dataset.save_to_disk: Arrow IPC stream shards
        try:
            files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{what} '{p}': state.json does not list the data files (_data_files); is this a "
                             f"folder written by datasets' save_to_disk?") from None
        for name in files:
            yield from _arrow_stream_rows(p / name, what)
        return
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError):
            splits = sorted(d.name for d in p.iterdir() if d.is_dir())
        if len(splits) != 1:
            raise InputError(f"{what} '{p}': a DatasetDict with splits {', '.join(splits)}; give one split's folder, "
                             f"e.g. {p / splits[0]}")
        yield from _folder_rows(p / splits[0], what)
        return
    shards = sorted(p.rglob("*.parquet"))
    if not shards:
        raise InputError(f"{what} '{p}': a folder with neither a datasets save_to_disk layout (state.json) nor "
                         f".parquet files; give a record file ({', '.join(TABLE_SUFFIXES)})")
    for f in shards:
        yield from _parquet_rows(f, what)


def _arrow_stream_rows(f: Path, what: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow as pa
    except ImportError:
        raise InputError("reading a datasets folder needs pyarrow: pip install 'hyperowl[data]'") from None
    if not f.is_file():
        raise InputError(f"{what} '{f}': listed in state.json but missing; copy the whole folder")
    try:
        with pa.memory_map(str(f)) as src:
            reader = pa.ipc.open_stream(src)
            i = 0
            for batch in reader:
                for row in batch.to_pylist():
                    yield f"{f}#row {i}", row
                    i += 1
    except pa.ArrowInvalid as e:
        raise InputError(f"{what} '{f}': not a readable Arrow file ({e})") from None


def _hub_rows(spec: str, what: str) -> Iterator[tuple[str, dict]]:
    name, _, split = spec[len(HUB_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{what} '{spec}': a hub dataset needs the datasets library: pip install 'hyperowl[hf]' "
                         f"(or download it and give the folder)") from None
    try:
        ds = datasets.load_dataset(name, split=split or None)
    except Exception as e:  # network, unknown name, missing split: the library's own message
        raise InputError(f"{what} '{spec}': cannot load ({type(e).__name__}: {e})") from None
    if isinstance(ds, dict):
        raise InputError(f"{what} '{spec}': the dataset has splits {', '.join(ds)}; name one: {spec}:{next(iter(ds))}")
    i = 0
    for table in ds.with_format("arrow").iter(batch_size=256):  # raw cells: images stay {"bytes", "path"}
        for row in table.to_pylist():
            yield f"{spec}#row {i}", row
            i += 1


def _check_row(where: str, row: Any) -> tuple[str, dict]:
    if not isinstance(row, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    return where, row
