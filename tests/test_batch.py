"""hyperowl batch on one machine: answers equal chat's, per-record faults, resume after SIGKILL, Parquet,
URLs, torchrun ranks."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hyperowl
import hyperowl.batch
from hyperowl.batch.output import journal_path
from hyperowl.errors import InputError

from batch_data import FAULTS, GOOD, make_input, rows_of

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           OMP_NUM_THREADS="1")
OPTS = dict(max_new_tokens=8, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def owl():
    return hyperowl.load(device="cpu")  # the embedded model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    make_input(d)
    return d


@pytest.fixture(scope="module")
def reference(owl, data, tmp_path_factory):
    """One uninterrupted local run: (summary, rows by id)."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    s = hyperowl.batch.run(data / "in.jsonl", out, model=owl, **OPTS)
    return s, {r["id"]: r for r in rows_of(out)}


def _records(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "in.jsonl").read_text().splitlines()[:GOOD]]


def test_answers_equal_chat_and_faults_get_the_cli_message(owl, data, reference, monkeypatch):
    s, rows = reference
    recs = _records(data)
    assert len(rows) == GOOD + len(FAULTS) + 1  # + the line that is not JSON; the repeated id is not written
    for rec in recs:  # greedy answers equal the one-conversation chat of each record
        want = owl.chat(rec["messages"][:-1], images=[str(data / p) for p in rec["images"]],
                        videos=[str(data / p) for p in rec["videos"]], max_new_tokens=8)
        got = rows[rec["id"]]
        assert got["answer"] == want and got["error"] is None
        assert got["usage"]["prompt_tokens"] > 0 and 1 <= got["usage"]["completion_tokens"] <= 8
        assert got["usage"]["image_tensors"] > 0
    assert any(r["videos"] for r in recs) and any(len(r["images"]) > 1 for r in recs)
    monkeypatch.chdir(data)  # what `hyperowl chat --image nope.png` prints, run in the data folder
    for k in ("missing", "corrupt", "mismatch"):
        rec = FAULTS[k][0]
        with pytest.raises(InputError) as e:
            owl.chat(rec["messages"], images=rec["images"])
        assert rows[k]["error"] == str(e.value) and rows[k]["answer"] is None
    assert "no 'messages'" in rows["nomessages"]["error"]
    bad_json = str(GOOD + len(FAULTS) + 1)  # a row without an id is named by its ordinal
    assert "not valid JSON" in rows[bad_json]["error"] and "in.jsonl:" in rows[bad_json]["error"]
    assert s["answered"] == GOOD and s["duplicates_not_written"] == 1
    reasons = {}
    for _, why in FAULTS.values():
        reasons[why] = reasons.get(why, 0) + 1
    reasons["bad record"] += 1  # the line that is not JSON
    assert s["failed_by_reason"] == reasons
    assert set(s["seconds"]) == {"read", "decode", "model", "write"}


def test_resume_after_sigkill_writes_each_id_once(owl, tmp_path, reference):
    make_input(tmp_path, n_single=24, n_multi=4, n_video=2, faults=False)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "hyperowl.cli", "batch", str(tmp_path / "in.jsonl"), "--out", str(out),
           "--batch-size", "1", "--max-new-tokens", "8", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # a kill at an arbitrary moment, mid-job
    proc.wait()
    written = out.read_bytes()
    assert 3 <= written.count(b"\n") < 30, "the job must be killed mid-run"
    if written.endswith(b"\n"):  # also the worst moment: half a row on disk
        out.write_bytes(written + b'{"id": "test-0000')
    s = hyperowl.batch.run(tmp_path / "in.jsonl", out, model=owl, max_new_tokens=8, batch_size=1, progress=False)
    rows = rows_of(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 30 and s["skipped_already_done"] >= 3
    full = tmp_path / "full.jsonl"  # the same job uninterrupted
    hyperowl.batch.run(tmp_path / "in.jsonl", full, model=owl, max_new_tokens=8, batch_size=1, progress=False)
    assert {r["id"]: r["answer"] for r in rows} == {r["id"]: r["answer"] for r in rows_of(full)}
    again = hyperowl.batch.run(tmp_path / "in.jsonl", out, model=owl, **OPTS)  # nothing left to do
    assert again["answered"] == again["failed"] == 0 and len(rows_of(out)) == 30


def test_parquet_in_and_out_resume_from_the_journal(owl, data, reference, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = _records(data)
    table = pa.Table.from_pylist([{"id": r["id"], "messages": r["messages"], "images": [str(data / p) for p in r["images"]],
                                   "videos": [str(data / p) for p in r["videos"]]} for r in recs])
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    # an interrupted earlier run: two rows in the journal (trusted, not recomputed) and a torn line
    journal = journal_path(out)
    kept = [{"id": recs[0]["id"], "answer": "FROM-JOURNAL", "usage": None, "error": None},
            {"id": recs[1]["id"], "answer": "FROM-JOURNAL", "usage": None, "error": None}]
    journal.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "x", "ans')
    s = hyperowl.batch.run(tmp_path / "in.parquet", out, model=owl, **OPTS)
    rows = {r["id"]: r for r in rows_of(out)}
    assert len(rows) == GOOD and s["answered"] == GOOD - 2 and not journal.exists()
    ref = reference[1]
    for r in recs[2:]:
        assert rows[r["id"]]["answer"] == ref[r["id"]]["answer"]
        assert rows[r["id"]]["usage"]["prompt_tokens"] == ref[r["id"]]["usage"]["prompt_tokens"]
    assert rows[recs[0]["id"]]["answer"] == "FROM-JOURNAL"
    assert hyperowl.batch.run(tmp_path / "in.parquet", out, model=owl, **OPTS)["answered"] == 0
    assert len(rows_of(out)) == GOOD


@pytest.fixture
def http_dir(data):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_media_urls(owl, data, reference, http_dir, tmp_path):
    recs = [r for r in _records(data) if r["videos"]][:1] + [r for r in _records(data) if len(r["images"]) > 1][:1]
    rows = [{**r, "images": [f"{http_dir}/{p}" for p in r["images"]], "videos": [f"{http_dir}/{p}" for p in r["videos"]]}
            for r in recs]
    rows.append({"id": "gone", "messages": [{"role": "user", "content": "<|image|>Colour?"}],
                 "images": [f"{http_dir}/nope.png"]})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = hyperowl.batch.run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", model=owl, **OPTS)
    got = {r["id"]: r for r in rows_of(tmp_path / "out.jsonl")}
    for r in recs:  # downloaded media answer as the local files do
        assert got[r["id"]]["answer"] == reference[1][r["id"]]["answer"]
    assert got["gone"]["error"] == f"image '{http_dir}/nope.png': cannot fetch the URL (HTTP 404); check the URL"
    assert s["failed_by_reason"] == {"missing media": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_the_local_run(data, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "hyperowl.cli", "batch", str(data / "in.jsonl"), "--out", str(out), "--batch-size", "3",
           "--max-new-tokens", "8", "--device", "cpu"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == len({x["id"] for x in rows}) == len(reference[1])
    assert {x["id"]: (x["answer"], x["error"]) for x in rows} == {k: (v["answer"], v["error"]) for k, v in reference[1].items()}
    assert not list(tmp_path.glob("out.jsonl.rank*"))  # rank journals merged and removed
    assert "8 answered, 5 failed" in r.stdout  # rank 0's summary counts both ranks


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    from hyperowl.cli import main

    assert main(["batch", str(data / "in.jsonl"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "unknown output type '.csv'" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "batch input" in capsys.readouterr().err


def test_batch_takes_chat_options():
    """Model, media and sampling options of `hyperowl batch` are chat's (one option group each)."""
    import argparse

    from hyperowl.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices

    def spec(name, opt):
        a = next(a for a in subs[name]._actions if opt in a.option_strings)
        return a.dest, a.default, a.choices, a.type, a.nargs, a.help

    for opt in ("--model", "--dtype", "--device", "--quantize", "--frames", "--fps", "--no-cut", "--system",
                "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed"):
        assert spec("batch", opt) == spec("chat", opt), opt
    a = subs["batch"].parse_args(["in.jsonl", "--out", "o.jsonl", "--ray"])
    assert (a.ray, a.replicas, a.gpus_per_replica) == ("auto", 1, None)
    assert subs["batch"].parse_args(["i", "--out", "o", "--ray", "ray://head:10001"]).ray == "ray://head:10001"


def test_iter_rows_keep_bad_goes_on_after_a_bad_line(tmp_path):
    from hyperowl.data.tables import count_rows, iter_rows

    f = tmp_path / "x.jsonl"
    f.write_text('{"id": 1}\n{broken\n[1, 2]\n\n{"id": 2}\n')
    rows = list(iter_rows(f, "batch input", keep_bad=True))
    assert [w.rsplit(":", 1)[1] for w, _ in rows] == ["1", "2", "3", "5"]
    assert rows[0][1] == {"id": 1} and rows[3][1] == {"id": 2}
    assert "not valid JSON" in str(rows[1][1]) and "must be a JSON object" in str(rows[2][1])
    assert count_rows(f, keep_bad=True) == 4
    with pytest.raises(InputError, match="x.jsonl:2: not valid JSON"):  # the default still stops at the first
        list(iter_rows(f))


def test_resume_refuses_another_model_or_options(owl, data, tmp_path):
    """Rows on disk are trusted on resume, so they must be the same job's: a model retrained into the same
    folder, or other sampling options, are refused (the eval runner's lesson)."""
    import shutil

    from safetensors.torch import load_file, save_file

    small = tmp_path / "in.jsonl"
    small.write_text("".join((data / "in.jsonl").read_text().splitlines(keepends=True)[:2]))
    for p in ("test",):  # the records' media, relative to the input
        (tmp_path / p).symlink_to(data / p)
    ck = tmp_path / "model"
    shutil.copytree(owl.checkpoint_dir, ck)
    out = tmp_path / "out.jsonl"
    hyperowl.batch.run(small, out, model=ck, **OPTS)
    with pytest.raises(InputError, match="different sampling"):
        hyperowl.batch.run(small, out, model=ck, **{**OPTS, "max_new_tokens": 4})
    weights = load_file(ck / "model.safetensors")
    name = max(weights, key=lambda k: weights[k].numel())  # the largest tensor ("fine-tuned"), same folder and shapes
    weights[name] = weights[name] * 1.5
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="different model"):
        hyperowl.batch.run(small, out, model=ck, **OPTS)
    assert len(rows_of(out)) == 2


def test_an_unreadable_input_stops_the_job_with_one_error(owl, tmp_path):
    """A fault of the whole file (not UTF-8 half-way) is raised from the preparing thread to the caller."""
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n\xff\xfe{"id": "b"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        hyperowl.batch.run(f, tmp_path / "out.jsonl", model=owl, **OPTS)


def test_prepare_ahead_keeps_order_and_raises_in_order():
    from hyperowl.batch.runner import _ahead

    def items():
        yield from range(5)
        raise InputError("record 5: broken")

    got = []
    with pytest.raises(InputError, match="record 5"):
        for x in _ahead(items(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert list(_ahead(iter(range(100)), 3)) == list(range(100))
    first = next(_ahead(iter(range(100)), 3))  # a consumer that stops early: the thread ends, nothing hangs
    assert first == 0
