"""Smoke run of bench/bench_batch.py (a few records, local path only: the Ray path is tests/test_batch_ray.py)."""

import json
import os
import subprocess
import sys

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def test_batch_bench_smoke(tmp_path):
    out = tmp_path / "batch.json"
    r = subprocess.run([sys.executable, "bench/bench_batch.py", "--records", "6", "--no-ray", "--max-new-tokens", "2",
                        "--machines", "1", "4", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["mode"] == "local" and row["items"] == 6 and row["failed"] == 0 and row["items_per_s"] > 0
    assert set(row["per_item_ms"]) == {"read", "decode", "model", "write"}
    scale = res["scaling"]["rows"]
    assert [s["machines"] for s in scale] == [1, 4] and scale[1]["items_per_s"] >= scale[0]["items_per_s"] > 0
