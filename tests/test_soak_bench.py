"""Short run (~20 s of load) of bench/bench_soak.py against the real server process: valid, invalid, oversized,
cancelled-mid-stream and disconnect-mid-body requests from 4 clients. No 5xx, no lost or duplicated response,
every job that reached the scheduler accounted for, no traceback in the server log, memory bounded."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("psutil")

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def test_soak_bench_short(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "bench/bench_soak.py", "--clients", "4", "--minutes", "0.35", "--out", str(out),
                        "--plot", str(tmp_path / "soak.png")], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["n_5xx"] == 0 and res["lost"] == 0 and res["duplicated"] == 0, r.stdout
    assert res["server_alive"] and res["server_log_tracebacks"] == 0, r.stdout
    assert res["jobs_accounted"]["failed"] == 0 and sum(res["jobs_accounted"].values()) == res["jobs_sent"] > 0
    assert res["greedy_answers_differing"] == 0
    by_kind = res["status_by_kind"]
    assert all(s == "200" for k in ("valid", "valid_stream") for s in by_kind[k])
    assert all(400 <= int(s) < 500 for k in ("invalid", "oversized") for s in by_kind[k])
    assert res["requests"] >= 20
    rss = res["rss_mib"]
    assert rss["peak"] < 1.5 * rss["start"], rss  # no growth with the load (the feature cache is bounded)
    assert (tmp_path / "soak.png").stat().st_size > 0
