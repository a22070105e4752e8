"""Smoke run of bench/bench_serve_load.py (--smoke: two low rates of a few seconds, short answers, an 8-frame
video) against real server processes, continuous and dynamic batching side by side: it runs end to end,
every request is answered, and it writes its JSON and PNG (numbers not asserted, except what holds on any
machine: the continuous engine's K/V per request follows the request's own size)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("psutil")
pytest.importorskip("matplotlib")

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def test_serve_load_bench_smoke(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "bench/bench_serve_load.py", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert [(row["rate"], row["scheduler"]) for row in res["load"]] == [(2.0, "dynamic"), (2.0, "continuous"),
                                                                         (6.0, "dynamic"), (6.0, "continuous")]
    for row in res["load"]:
        assert row["failed"] == 0 and row["completed"] == row["requests"] > 0, row
        assert row["output_tok_s"] > 0 and row["ttft_p99_s"] >= row["ttft_p50_s"] > 0 and row["peak_rss_mib"] > 0
    assert res["load"][1]["health"]["batching"] == "continuous" and "kv_cache" in res["load"][1]["health"]
    assert set(res["short_during_long"]) == {"dynamic", "continuous"}
    assert res["followup"]["continuous"]["followup_cached_tokens"] > 0
    assert res["followup"]["continuous"]["responses_followup_cached_tokens"] > 0  # previous_response_id
    kv = {row["request"]: row for row in res["kv_bytes"]}
    cont = [row["continuous_kv_bytes"] for row in res["kv_bytes"]]
    assert len(set(row["dynamic_kv_bytes_per_row"] for row in res["kv_bytes"])) == 1  # every padded row alike
    assert kv["text, 40 tokens"]["continuous_kv_bytes"] < kv["1 image"]["continuous_kv_bytes"] < \
        kv["8 images"]["continuous_kv_bytes"] and min(cont) > 0
    assert (tmp_path / "load.png").stat().st_size > 0


def test_followup_sweep_smoke(tmp_path):
    """--followup-only: the follow-up case at two history lengths (one answered turn, two), reuse vs fresh. What
    holds on any machine: on the Responses route (exact ids) the whole history is reused, its last partly filled
    block included, but for the last answer token (its K/V are computed only now); a longer history reuses more; the new turn is all that is read beyond it."""
    out = tmp_path / "follow.json"
    r = subprocess.run([sys.executable, "bench/bench_serve_load.py", "--followup-only", "--history", "6", "6,6",
                        "--followup-tokens", "3", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    rows = res["followup"]
    assert [(row["answers"], row["route"]) for row in rows] == [([6], "chat"), ([6], "responses"),
                                                               ([6, 6], "responses")]
    for row in rows:
        assert row["fresh_ttft_s"] > 0 and row["reuse_ttft_s"] > 0 and row["new_turn_tokens"] > 0
        assert row["prompt_tokens"] == row["history_tokens"] + row["new_turn_tokens"]
    one, two = rows[1], rows[2]
    for row in (one, two):  # all but the last answer token (sampled, never fed: no K/V yet), partial block included
        assert row["history_tokens_not_reused"] == 1, row
    assert 0 < rows[0]["history_tokens_not_reused"] <= res["config"]["block_size"]  # chat: re-tokenized text
    assert two["history_tokens"] > one["prompt_tokens"] and two["cached_tokens"] > one["cached_tokens"]
    assert (tmp_path / "follow.png").stat().st_size > 0
