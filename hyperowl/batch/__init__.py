"""Batch inference over record files: one process, torchrun ranks, or a Ray cluster.

    import hyperowl.batch
    summary = hyperowl.batch.run("questions.jsonl", "answers.jsonl", model="mPLUG/mPLUG-Owl3-7B-241101",
                                 max_new_tokens=64)                      # this machine
    hyperowl.batch.run("q.parquet", "a.parquet", model=..., ray="auto", replicas=8, gpus_per_replica=1)

Design note: input rows are the training/eval record form (`records.py`), the output is one row per id
{id, answer, usage, error} written durably and resumed by id (`output.py`). The local loop and torchrun
live in `runner.py`; `on_ray.py` runs the same two halves (CPU `prepare`, model `answer`) as a Ray Data
pipeline: CPU tasks plan and decode, an actor pool holds the model. `hyperowl batch` is the CLI of `run`.
docs/batch.md says how to run it on clusters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError

log = logging.getLogger(__name__)

__all__ = ["run"]


def run(input: str | os.PathLike, out: str | os.PathLike, *, model: Any = None, batch_size: int = 8,
        max_frames: int = 16, fps: Optional[float] = None, cut: Optional[bool] = None, system: Optional[str] = None,
        max_new_tokens: int = 1024, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        repetition_penalty: float = 1.0, seed: Optional[int] = None, dtype: Optional[str] = None,
        device: Optional[str] = None, quantize: Optional[str] = None, feature_cache_mb: float = 512.0,
        ray: Any = None, replicas: int = 1, gpus_per_replica: Optional[float] = None, cpus_per_replica: float = 1.0,
        progress: bool = True, json_schema: Any = None) -> dict:
    """Answer every record of `input` (JSONL or Parquet) into `out` (.jsonl or .parquet), resuming: ids
    already in `out` are skipped. Returns the summary (answered, failed by reason, seconds per stage, ...).

    model: a checkpoint directory / hub id (None: the embedded model) or a loaded `hyperowl.Pipeline` (not
    with `ray`: the actors load their own copy from `model`'s checkpoint directory).
    Sampling and media options are those of `Pipeline.chat` (greedy by default). json_schema: a JSON schema
    (dict) or "json_object": every answer is JSON valid against it (grammar-constrained; needs xgrammar), so a
    dataset is tagged straight into fields.
    ray: None = this machine (torchrun ranks when WORLD_SIZE > 1); "auto" or "local" or an address
    ("ray://head:10001", "head:6379") = a Ray Data pipeline with `replicas` model actors of
    `gpus_per_replica` GPUs (None: 1 if the cluster has GPUs, else 0) and `cpus_per_replica` CPUs.
    """
    from . import output as out_mod

    input_path = Path(input)
    if not input_path.is_file():
        raise InputError(f"batch input '{input}': no such file")
    out_path = out_mod.check_output_path(out)
    if batch_size < 1 or max_frames < 1 or replicas < 1:
        raise InputError("--batch-size, --frames and --replicas must be >= 1")
    if out_path.resolve() == input_path.resolve():
        raise InputError(f"--out '{out}' is the input file; choose another output")
    media = dict(max_frames=max_frames, fps=fps, cut=cut, system=system)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    from ..chat import make_params

    make_params((), **sampling)  # a bad option fails now, before any model is loaded
    if json_schema is not None:  # part of the job's key: a resumed run keeps its schema
        if not (json_schema == "json_object" or isinstance(json_schema, dict)):
            raise InputError("json_schema must be a JSON schema object or 'json_object'")
        sampling["json_schema"] = json_schema
    job = {"input": input_path.name, "media": media, "sampling": sampling}
    if ray is not None and ray is not False:
        from .on_ray import run_ray

        if model is not None and not isinstance(model, (str, os.PathLike)):
            if getattr(model, "checkpoint_dir", None) is None:
                raise InputError("with ray, pass the model as a checkpoint directory or hub id (each actor loads it)")
            model = model.checkpoint_dir
        return run_ray(input_path, out_path, job=job, model=model, address=ray, replicas=replicas,
                       gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, batch_size=batch_size,
                       media=media, sampling=sampling, dtype=dtype, quantize=quantize,
                       feature_cache_mb=feature_cache_mb, progress=progress)
    from .runner import load_pipeline, run_local

    pipe = load_pipeline(model, dtype=dtype, device=device, quantize=quantize, feature_cache_mb=feature_cache_mb)
    return run_local(pipe, input_path, out_path, job=job, batch_size=batch_size, media=media, sampling=sampling,
                     progress=progress)
