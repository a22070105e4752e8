"""Batch-job inputs for tests/test_batch*.py: a generated synthetic split plus one record of every fault kind."""

from __future__ import annotations

import json
from pathlib import Path

GOOD = 8  # records of the generated split written first (single images, multi-image, videos)
FAULTS = {  # id -> (record, failure reason); the ids the job must write with an error
    "missing": ({"messages": [{"role": "user", "content": "<|image|>What colour is the circle?"}],
                 "images": ["nope.png"]}, "missing media"),
    "corrupt": ({"messages": [{"role": "user", "content": "<|image|>What colour is the circle?"}],
                 "images": ["corrupt.png"]}, "unreadable media"),
    "mismatch": ({"messages": [{"role": "user", "content": "<|image|><|image|>Same?"}],
                  "images": ["test/images/000000_0.png"]}, "placeholder mismatch"),
    "nomessages": ({"images": []}, "bad record"),
}


def make_input(d: Path, n_single: int = 4, n_multi: int = 2, n_video: int = 2, faults: bool = True) -> Path:
    """d/in.jsonl: the split's records (reference answers included: batch drops a trailing assistant
    message), then the fault records, a repeated id and a line that is not JSON."""
    from hyperowl.data.synthetic import generate_split

    split = generate_split(d, "test", n_single, n_multi, n_video, seed=1)
    lines = split.read_text().splitlines()
    if faults:
        (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        lines += [json.dumps({"id": k, **rec}) for k, (rec, _) in FAULTS.items()]
        lines.append(json.dumps({"id": "test-000000", "messages": [{"role": "user", "content": "again"}]}))
        lines.append("{this is not json")
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    return d / "in.jsonl"


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]
