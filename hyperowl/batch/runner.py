"""Batch inference on one machine (one process, or torchrun ranks): records -> prepared prompts -> engine.

Design note: the loop reads records in input order (`records.read_records`, skipping ids already in the
output), prepares each one (`records.prepare`: plan + feature-cache lookup + decoding, CPU), and answers
`batch_size` prepared records at a time with `answer`: every cache miss of the batch through the vision
tower in one call (`Encoder.finish`) and one padded `Engine.generate`. Preparing runs up to two batches
ahead in a thread, so media decoding overlaps the model (stage seconds overlap too). Rows are written
after each batch (`output.Journal`: one write + fsync). A record that fails is written with its `error` and counted by
reason; the job goes on. If the engine refuses a batch (InputError/ValueError, e.g. a prompt longer than
the model allows), its records are answered one by one so the fault lands on the record that caused it.

`answer` is also what Ray's model actors run (`hyperowl.batch.on_ray`), so both paths make the same
requests. Under torchrun (WORLD_SIZE > 1) rank r answers the records whose input ordinal is r mod world,
the rule `hyperowl eval` uses (`eval.runner.dist_info` sets up the gloo group), into its own journal;
rank 0 merges the journals into OUTPUT after a barrier. Time is accounted per stage (read, decode, model,
write) for the summary and bench/bench_batch.py.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from ..chat import detokenize, make_constraint, make_params
from ..engine import Engine, Request
from ..errors import InputError
from . import output as out_mod
from .records import Record, prepare, read_records, reason_of

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "model", "write")
PREFETCH = 2  # batches of records prepared ahead of the model


@dataclass
class Prepared:
    """A record ready for the model: token ids, image positions, media items (cached features or pixels)."""

    rec: Record
    input_ids: torch.Tensor
    image_positions: torch.Tensor
    pending: list  # encoder.Pending per media item


@dataclass
class Tally:
    """What a run did: rows written (answered / failed by reason), ids skipped, seconds per stage."""

    answered: int = 0
    failed: Counter = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add_rows(self, rows: Iterable[dict]) -> None:
        for r in rows:
            if r.get("error") is None:
                self.answered += 1
            else:
                self.failed[reason_of(r["error"])] += 1

    def merge(self, other: "Tally") -> None:
        self.answered += other.answered
        self.failed.update(other.failed)
        self.duplicates += other.duplicates
        for k in STAGES:
            self.seconds[k] += other.seconds[k]

    def summary(self, **extra: Any) -> dict:
        return {"answered": self.answered, "failed": sum(self.failed.values()), "failed_by_reason": dict(self.failed),
                "duplicates_not_written": self.duplicates, "skipped_already_done": self.skipped,
                "seconds": dict(self.seconds), **extra}


def error_row(rec: Record) -> dict:
    return {"id": rec.id, "answer": None, "usage": None, "error": rec.error}


def usage(prep: Prepared, completion: int, tokens_per_image: int) -> dict:
    """The server's usage fields (serve.protocol.usage_body): text tokens, and visual work apart."""
    tensors = sum(p.item.count for p in prep.pending)
    cached = sum(p.item.count for p in prep.pending if p.hit)
    prompt = int(prep.input_ids.numel())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "image_tensors": tensors, "visual_tokens": tensors * tokens_per_image,
            "cached_visual_tokens": cached * tokens_per_image}


def answer(pipe, batch: list[Prepared], sampling: dict) -> list[dict]:
    """Output rows of prepared records: the batch's media through the tower once, one engine batch."""
    if not batch:
        return []
    sampling = dict(sampling)
    schema = sampling.pop("json_schema", None)
    params = make_params(pipe.stop_ids, **sampling)
    tpi = pipe.family.feature_tokens(pipe.model.config)
    embeds = pipe.encoder.finish([p.pending for p in batch])
    reqs = [Request(p.input_ids, e, p.image_positions if e is not None else None, params,
                    constraint=make_constraint(pipe, schema)) for p, e in zip(batch, embeds)]
    try:
        outs = Engine(pipe.model).generate(reqs)
    except (InputError, ValueError) as e:
        if len(batch) == 1:
            return [{"id": batch[0].rec.id, "answer": None, "usage": None, "error": str(e)}]
        rows = []
        for p, r in zip(batch, reqs):  # find the record at fault; the others are answered alone
            try:
                rows.append(_row(pipe, p, Engine(pipe.model).generate([r])[0], params, tpi))
            except (InputError, ValueError) as e1:
                rows.append({"id": p.rec.id, "answer": None, "usage": None, "error": str(e1)})
        return rows
    return [_row(pipe, p, o, params, tpi) for p, o in zip(batch, outs)]


def _row(pipe, p: Prepared, ids: list[int], params, tpi: int) -> dict:
    text = detokenize(pipe.processor.tokenizer, ids, params.stop_token_ids)
    return {"id": p.rec.id, "answer": text, "usage": usage(p, len(ids), tpi), "error": None}


def prepare_local(pipe, rec: Record, media: dict) -> Prepared:
    """A record planned, its media looked up in the feature cache and decoded on a miss (no model)."""
    plan, pending = prepare(pipe.processor, rec, media, pipe.encoder.lookup)
    return Prepared(rec, plan.input_ids, plan.image_positions, pending)


def _ahead(items: Iterator, n: int) -> Iterator:
    """`items`, produced up to `n` ahead in a thread: records are planned and their media decoded while the
    model answers the previous batch (on a GPU the two overlap fully). An exception of the producer is raised
    here, in order; a consumer that stops early lets the thread end."""
    q: queue.Queue = queue.Queue(maxsize=max(1, n))
    end, stop = object(), threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((None, x)):
                    return
        except BaseException as e:  # handed to the consumer
            put((e, None))
            return
        put((None, end))

    threading.Thread(target=work, name="batch-prepare", daemon=True).start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()


def _timed(tally: Tally, stage: str, t0: float) -> float:
    t1 = time.perf_counter()
    tally.seconds[stage] += t1 - t0
    return t1


def model_identity(pipe) -> str:
    """The model part of a job's key (output.check_run): its checkpoint files, else its weights in memory."""
    from ..eval.runner import model_fingerprint

    if pipe.checkpoint_dir is not None:
        return out_mod.checkpoint_fingerprint(Path(pipe.checkpoint_dir))
    return model_fingerprint(pipe.model)


def run_local(pipe, input_path: Path, out: Path, *, job: dict, batch_size: int, media: dict, sampling: dict,
              progress: bool = True) -> dict:
    """One process, or one torchrun rank (see the module note). Returns the summary."""
    from tqdm import tqdm

    from ..eval.runner import dist_info
    from ..data.tables import count_rows

    rank, world = dist_info()
    out_mod.check_run(out, {**job, "model": model_identity(pipe)}, write=rank == 0)
    done = out_mod.done_ids(out)
    tally = Tally()
    journal = out_mod.Journal(out_mod.journal_path(out, rank if world > 1 else None))
    total = count_rows(input_path, "batch input", keep_bad=True)
    bar = tqdm(total=total, initial=min(len(done), total), desc="batch", unit="item", smoothing=0.1,
               disable=not progress or rank != 0, dynamic_ncols=True)
    todo: list[Prepared] = []

    def flush() -> None:
        nonlocal todo
        t = time.perf_counter()
        rows = answer(pipe, todo, sampling)
        t = _timed(tally, "model", t)
        write(rows)
        _timed(tally, "write", t)
        todo = []

    def write(rows: list[dict]) -> None:
        journal.write(rows)
        tally.add_rows(rows)
        bar.update(len(rows) * world)

    def records() -> Iterator[tuple[str, Any]]:
        """("duplicate" | "error", Record) or ("ready", Prepared), in input order (runs ahead in a thread)."""
        t = time.perf_counter()
        for rec in read_records(input_path, skip=lambda i: i in done):
            t = _timed(tally, "read", t)
            if rec.reason == "duplicate id":  # one row per id: the repeat is reported, not written
                yield "duplicate", rec
            elif rec.index % world == rank:
                if rec.error is None:
                    try:
                        prep = prepare_local(pipe, rec, media)
                    except InputError as e:
                        rec.error, rec.reason = str(e), reason_of(str(e))
                    _timed(tally, "decode", t)
                yield ("error", rec) if rec.error is not None else ("ready", prep)
            t = time.perf_counter()

    for kind, x in _ahead(records(), PREFETCH * batch_size):
        if kind == "duplicate":
            log.warning("%s", x.error)
            tally.duplicates += 1
            bar.update(1 if rank == 0 else 0)
        elif kind == "error":
            t = time.perf_counter()
            write([error_row(x)])
            _timed(tally, "write", t)
        else:
            todo.append(x)
            if len(todo) >= batch_size:
                flush()
    flush()
    journal.close()
    bar.close()
    tally.skipped = len(done)
    if world > 1:
        tally = _gather(tally, rank, world)
    if rank == 0:
        out_mod.finalize(out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank returns before OUTPUT is complete
    return tally.summary(output=str(out), world_size=world)


def _gather(tally: Tally, rank: int, world: int) -> Tally:
    """Every rank's counts and stage seconds, summed (the barrier before rank 0 merges the journals)."""
    import torch.distributed as dist

    parts: list[Optional[Tally]] = [None] * world
    dist.all_gather_object(parts, tally)
    total = Tally(skipped=tally.skipped)
    for p in parts:
        total.merge(p)
    total.duplicates = tally.duplicates  # every rank reads every record: counted once
    return total


def load_pipeline(model: Any, *, dtype=None, device=None, quantize=None, feature_cache_mb: float = 512.0):
    """A Pipeline as given, or loaded (torchrun: one GPU per rank, as `hyperowl eval` does)."""
    import hyperowl

    if model is not None and not isinstance(model, (str, os.PathLike)):
        if getattr(model, "processor", None) is None:
            raise InputError("batch needs a Pipeline with a processor (a checkpoint with a tokenizer.json)")
        return model
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    pipe = hyperowl.load(model, dtype=dtype, device=device, quantize=quantize, feature_cache_mb=feature_cache_mb)
    if pipe.processor is None:
        raise InputError(f"model '{model or pipe.checkpoint_dir}': no tokenizer.json in the checkpoint; batch needs one")
    return pipe
