"""hyperowl batch --ray on a local Ray cluster started here (2 CPUs, two model actors): greedy answers equal
the local run's, and an actor SIGKILLed mid-job loses and repeats nothing."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

import hyperowl  # noqa: E402
import hyperowl.batch  # noqa: E402
from hyperowl.batch.on_ray import KILL_ONCE_ENV  # noqa: E402

from batch_data import make_input, rows_of  # noqa: E402

OPTS = dict(max_new_tokens=8, batch_size=3, progress=False)
RAY = dict(ray="auto", replicas=2, cpus_per_replica=0.5)  # two actors + one CPU for the decoding tasks


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input (faults included) and the local run's rows by id."""
    d = tmp_path_factory.mktemp("rayjob")
    make_input(d, n_single=6, n_multi=3, n_video=3)
    out = d / "local.jsonl"
    hyperowl.batch.run(d / "in.jsonl", out, model=hyperowl.load(device="cpu"), **OPTS)
    return d, {r["id"]: r for r in rows_of(out)}


def _same(rows: list[dict], local: dict) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(local)  # nothing lost, nothing twice
    for r in rows:
        want = local[r["id"]]
        assert (r["answer"], r["error"]) == (want["answer"], want["error"]), r["id"]
        if want["usage"] is not None:
            assert r["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
            assert r["usage"]["image_tensors"] == want["usage"]["image_tensors"]


def test_ray_answers_equal_the_local_run(cluster, job, tmp_path):
    d, local = job
    s = hyperowl.batch.run(d / "in.jsonl", tmp_path / "out.parquet", **OPTS, **RAY)
    _same(rows_of(tmp_path / "out.parquet"), local)
    assert s["answered"] == sum(r["error"] is None for r in local.values()) and s["duplicates_not_written"] == 1
    assert s["seconds"]["decode"] > 0 and s["seconds"]["model"] > 0


def test_ray_actor_killed_mid_job(cluster, job, tmp_path, monkeypatch):
    d, local = job
    marker = tmp_path / "kill-one-actor"
    marker.touch()
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))  # the first actor on its second batch SIGKILLs itself
    out = tmp_path / "out.jsonl"
    hyperowl.batch.run(d / "in.jsonl", out, **OPTS, **RAY)
    assert not marker.exists(), "an actor must have been killed"
    _same(rows_of(out), local)
    again = hyperowl.batch.run(d / "in.jsonl", out, **OPTS, **RAY)  # resumed: nothing to do
    assert again["answered"] == again["failed"] == 0 and len(rows_of(out)) == len(local)
