"""Batch inference as a Ray Data pipeline: CPU tasks plan and decode, an actor pool holds the model.

Design note
-----------
    driver: read_records (tables.iter_rows; ids already in OUTPUT skipped, bad rows written at once)
      -> ray.data.from_items(records)             one block per `batch_size` records
      -> map_batches(_decode_batch)               CPU tasks: plan + decode + preprocess (records.prepare)
      -> map_batches(_Answerer, ActorPoolStrategy) `replicas` actors, each a Pipeline on `gpus_per_replica`
                                                   GPUs: feature cache, tower, engine (runner.answer)
      -> driver: iter_batches -> output.Journal    append + fsync, then output.finalize
The two halves are the functions the local loop runs, so greedy answers equal the local run's.

Writing: Ray's file writers (`write_json`/`write_parquet`) write one file per block from the workers, and a
block whose task is retried after a node loss may be written again under another name, so they cannot keep
"one row per id" nor resume by id. The results are small (text + counts), so the driver streams them
(`iter_batches`, Ray's streaming executor) into the same durable journal as the local path: the same
no-duplicate and resume guarantees, and an id already written is never written again (checked on write).
A model actor that dies is restarted by Ray Data (max_restarts=-1) and its unfinished batches are retried;
a batch's rows reach the driver only when the batch completes, so nothing is lost or repeated.

Pixels travel between the stages as raw float32 bytes (an Arrow binary column; numpy byte arrays would
drop trailing zero bytes) with their shape in the row's JSON `meta`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError
from . import output as out_mod
from .records import Record, load_processor, prepare, read_records

log = logging.getLogger(__name__)

KILL_ONCE_ENV = "_HYPEROWL_BATCH_KILL_ONCE"  # tests: the first actor to see this file SIGKILLs itself mid-job
DECODE_TASK_MEMORY = 512 * 2**20  # reserved per decoding task: one batch's pixels (cut images, video frames)
_PROCESSORS: dict[str, Any] = {}  # per worker process: model dir -> processor (tasks reuse worker processes)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'hyperowl[batch]' (or pip install 'ray[data]')") from None
    return ray


def _processor(model_dir: str) -> Any:
    if model_dir not in _PROCESSORS:
        _PROCESSORS[model_dir] = load_processor(model_dir)
    return _PROCESSORS[model_dir]


def _decode_batch(batch, model_dir: str, media: dict):
    """CPU task: records -> token ids, image positions, media item keys and pixels (or the record's error)."""
    import pyarrow as pa

    proc = _processor(model_dir)
    out = {"id": [], "meta": [], "pixels": [], "error": [], "t_decode": []}
    for row in batch.to_pylist():
        t0 = time.perf_counter()
        rec = Record(**json.loads(row["record"]))
        meta, pixels, error = None, b"", None
        try:
            plan, px = prepare(proc, rec, media, lambda p: [proc.item_pixels(i) for i in p.items])
            items = [[i.kind, i.name, i.count, i.key] for i in plan.items]
            flat = torch.cat(px) if len(px) > 1 else (px[0] if px else None)
            meta = {"input_ids": plan.input_ids.tolist(), "positions": plan.image_positions.tolist(), "items": items,
                    "shape": list(flat.shape) if flat is not None else None}
            if flat is not None:
                pixels = flat.to(torch.float32).contiguous().numpy().tobytes()
        except InputError as e:
            error = str(e)
        out["id"].append(rec.id)
        out["meta"].append(json.dumps(meta) if meta is not None else None)
        out["pixels"].append(pixels)
        out["error"].append(error)
        out["t_decode"].append(time.perf_counter() - t0)
    return pa.table({"id": pa.array(out["id"], pa.string()), "meta": pa.array(out["meta"], pa.string()),
                     "pixels": pa.array(out["pixels"], pa.binary()), "error": pa.array(out["error"], pa.string()),
                     "t_decode": pa.array(out["t_decode"], pa.float64())})


class _Answerer:
    """A model replica (Ray actor): prepared records -> output rows through `runner.answer`."""

    def __init__(self, model_dir: str, dtype: Optional[str], quantize: Optional[str], feature_cache_mb: float,
                 sampling: dict, threads: int, kill_once: Optional[str] = None) -> None:
        from .runner import load_pipeline

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.pipe = load_pipeline(model_dir, dtype=dtype, device=device, quantize=quantize,
                                  feature_cache_mb=feature_cache_mb)
        self.sampling, self.kill_once, self.calls = sampling, kill_once, 0

    def _prepared(self, rid: str, meta: dict, pixels: bytes):
        """A decoded row -> runner.Prepared: the feature cache asked first (Encoder.lookup without decoding),
        the shipped pixels kept for the misses."""
        from ..processing.plan import MediaItem, Plan
        from .runner import Prepared

        items = [MediaItem(kind, name, count, None, _key=key) for kind, name, count, key in meta["items"]]
        plan = Plan(torch.tensor(meta["input_ids"], dtype=torch.long), torch.tensor(meta["positions"], dtype=torch.long),
                    items, prompt="")
        pending = self.pipe.encoder.lookup(plan, decode=False)
        if meta["shape"] is not None:
            flat = torch.from_numpy(np.frombuffer(pixels, dtype=np.float32).copy()).view(*meta["shape"])
            for p, part in zip(pending, flat.split([i.count for i in items])):
                if p.embeds is None:
                    p.pixels = part  # float32, as processor.item_pixels made them
        return Prepared(Record(-1, rid, ""), plan.input_ids, plan.image_positions, pending)

    def __call__(self, batch):
        import pyarrow as pa

        from .runner import answer

        self.calls += 1
        if self.kill_once and self.calls >= 2 and os.path.exists(self.kill_once):
            try:
                os.unlink(self.kill_once)  # only one actor wins the claim, after a batch of its own is done
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        prepared, errors = [], {}
        for r in rows:
            if r["error"] is not None:
                errors[r["id"]] = r["error"]
                continue
            prepared.append(self._prepared(r["id"], json.loads(r["meta"]), r["pixels"]))
        answered = {row["id"]: row for row in answer(self.pipe, prepared, self.sampling)}
        t_model = (time.perf_counter() - t0) / max(1, len(rows))
        out = []
        for r in rows:
            a = answered.get(r["id"])
            out.append({"id": r["id"], "answer": a["answer"] if a else None,
                        "usage": json.dumps(a["usage"]) if a and a["usage"] is not None else None,
                        "error": errors.get(r["id"], a["error"] if a else None),
                        "t_decode": r["t_decode"], "t_model": t_model})
        return pa.Table.from_pylist(out, schema=pa.schema([("id", pa.string()), ("answer", pa.string()),
                                                           ("usage", pa.string()), ("error", pa.string()),
                                                           ("t_decode", pa.float64()), ("t_model", pa.float64())]))


def _connect(ray, address: Any) -> bool:
    """Join the cluster (or start a local one); True when this call started Ray (and should stop it)."""
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=False)
    if address in (True, "auto"):
        try:
            ray.init(address="auto", **kw)
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local one")
            ray.init(**kw)
    elif address == "local":
        ray.init(**kw)
    else:
        ray.init(address=str(address), **kw)
    return True


def run_ray(input_path: Path, out: Path, *, job: dict, model: Any, address: Any, replicas: int,
            gpus_per_replica: Optional[float], cpus_per_replica: float, batch_size: int, media: dict, sampling: dict,
            dtype: Optional[str], quantize: Optional[str], feature_cache_mb: float, progress: bool = True) -> dict:
    """The Ray Data pipeline of the module note. Returns the summary (as the local run's)."""
    from tqdm import tqdm

    from ..checkpoint import resolve
    from ..data.tables import count_rows
    from .runner import Tally, error_row

    import hyperowl

    ray = _import_ray()
    model_dir = str(resolve(model if model is not None else hyperowl.default_model_dir()))
    load_processor(model_dir)  # a model without a tokenizer fails here, before the cluster is asked for anything
    out_mod.check_run(out, {**job, "model": out_mod.checkpoint_fingerprint(Path(model_dir))})
    started = _connect(ray, address)
    try:
        t_start = time.perf_counter()
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        done = out_mod.done_ids(out)
        tally = Tally(skipped=len(done))
        journal = out_mod.Journal(out_mod.journal_path(out))
        total = count_rows(input_path, "batch input", keep_bad=True)
        bar = tqdm(total=total, initial=min(len(done), total), desc="batch (ray)", unit="item", smoothing=0.1,
                   disable=not progress, dynamic_ncols=True)
        t = time.perf_counter()
        items = []
        for rec in read_records(input_path, skip=lambda i: i in done):
            if rec.reason == "duplicate id":
                log.warning("%s", rec.error)
                tally.duplicates += 1
                bar.update(1)
            elif rec.error is not None:
                journal.write([error_row(rec)])
                tally.add_rows([error_row(rec)])
                bar.update(1)
            else:
                items.append({"record": json.dumps(rec.to_dict())})
        tally.seconds["read"] += time.perf_counter() - t
        first = None
        if items:
            first = _pipeline(ray, items, model_dir, journal, tally, bar, replicas=replicas, gpus=gpus_per_replica,
                      cpus=cpus_per_replica, batch_size=batch_size, media=media, sampling=sampling, dtype=dtype,
                      quantize=quantize, feature_cache_mb=feature_cache_mb)
        journal.close()
        bar.close()
        out_mod.finalize(out)
        return tally.summary(output=str(out), world_size=1, ray_replicas=replicas, gpus_per_replica=gpus_per_replica,
                             wall_seconds=time.perf_counter() - t_start,
                             first_rows_seconds=None if first is None else first[0] - t_start,
                             first_rows=None if first is None else first[1])
    finally:
        if started:
            ray.shutdown()


def _pipeline(ray, items: list[dict], model_dir: str, journal, tally, bar, *, replicas: int, gpus: float,
              cpus: float, batch_size: int, media: dict, sampling: dict, dtype, quantize,
              feature_cache_mb: float) -> tuple[float, int]:
    """Runs the pipeline into the journal; returns (perf_counter time, row count) of the first batch out (after
    the actors have loaded the model: the steady state starts there)."""
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # ours counts items, with the rows already done
    blocks = max(1, -(-len(items) // batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # Decoding tasks reserve memory and the actors none: besides the reservation, this keeps Ray from fusing the
    # decoding into the model actors (it must run as CPU tasks beside them, not serially inside a GPU actor).
    ds = ds.map_batches(_decode_batch, fn_kwargs=dict(model_dir=model_dir, media=media), batch_format="pyarrow",
                        batch_size=batch_size, num_cpus=1, memory=DECODE_TASK_MEMORY)
    ds = ds.map_batches(_Answerer, fn_constructor_kwargs=dict(
        model_dir=model_dir, dtype=dtype, quantize=quantize, feature_cache_mb=feature_cache_mb, sampling=sampling,
        threads=int(cpus), kill_once=os.environ.get(KILL_ONCE_ENV)), batch_format="pyarrow", batch_size=batch_size,
        compute=ActorPoolStrategy(size=replicas), num_gpus=gpus, num_cpus=cpus)
    written: set[str] = set()
    first = None
    t = time.perf_counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = []
        for r in batch.to_pylist():
            tally.seconds["decode"] += r.pop("t_decode") or 0.0
            tally.seconds["model"] += r.pop("t_model") or 0.0
            if r["id"] in written:  # cannot happen (a retried batch is emitted once); kept as the guarantee
                log.warning("row %s produced twice; written once", r["id"])
                continue
            written.add(r["id"])
            r["usage"] = json.loads(r["usage"]) if r["usage"] else None
            rows.append(r)
        t1 = time.perf_counter()
        first = first or (t1, len(rows))
        journal.write(rows)
        tally.add_rows(rows)
        bar.update(len(rows))
        t = time.perf_counter()
        tally.seconds["write"] += t - t1
    return first

