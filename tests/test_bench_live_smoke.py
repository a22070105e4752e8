"""Smoke run of bench/bench_live.py (embedded model, a few seconds of stream): it runs, writes its JSON and
PNG, and the live session's first tokens equal the naive path's. Numbers are not asserted."""

import json
import os
import subprocess
import sys


def test_live_bench_smoke(tmp_path):
    out = tmp_path / "live.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "bench/bench_live.py", "--models", "embedded", "--times", "2", "5",
                        "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [(row["stream_s"], row["frames"]) for row in res["rows"]] == [(2, 2), (5, 5)]
    assert all(row["live_ttft_s"] > 0 and row["naive_ttft_s"] > 0 and row["same_first_token"] for row in res["rows"])
    assert res["summary"]["embedded"]["same_first_tokens"] and out.with_suffix(".png").stat().st_size > 0
