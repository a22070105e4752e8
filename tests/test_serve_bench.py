"""Smoke run of bench/bench_serve.py at toy sizes: it runs end to end and writes its JSON (numbers not asserted)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def test_serve_bench_smoke(tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--clients", "1", "2", "--requests", "1", "--max-tokens", "3",
                        "--hidden", "64", "--layers", "2", "--vision-hidden", "64", "--vision-layers", "1", "--image-size",
                        "28", "--frames", "3", "--trials", "1", "--device", "cpu", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["clients"] for row in res["throughput"]] == [1, 2]
    assert all(row["completion_tokens"] == 3 * row["requests"] for row in res["throughput"])
    assert [row["media"] for row in res["feature_cache_ttft"]] == ["image", "video"]
    assert all(row["first_ttft_s"] > 0 and row["second_ttft_s"] > 0 for row in res["feature_cache_ttft"])
