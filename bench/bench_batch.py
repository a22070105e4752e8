"""Batch inference benchmark: items/s of `hyperowl batch` locally vs `--ray` with N replicas on this machine,
the time split (read, decode, model, write) and a scaling model for N machines built from that split.

Dataset (stated, generated offline): `--records` records of the synthetic visual world
(hyperowl.data.synthetic, seed 0), 50% single-image questions, 30% multi-image (2-4 images), 20% videos
(8 frames, 64x64, mp4). Model: the embedded default model (hyperowl/assets/owl3-synthetic) unless --model;
greedy answers of at most --max-new-tokens tokens.

Time split. Local: seconds of each stage of the one process. Ray: read and write are the driver's, decode
is the CPU tasks' and model the actors' seconds summed over workers (they overlap in wall time).

Scaling model (per item, from the local split): read r and write w run on the driver (serial), decode d
on any CPU core, model m on one replica. With N machines of C decoding cores and R replicas each:
    items/s(N) = min(N R / m, N C / d, 1 / (r + w))
The first term that binds is reported. `--gpu-model-ms` replaces m by a GPU measurement.

    python bench/bench_batch.py [--records 200] [--replicas 2] [--no-ray] [--out docs/batch.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

import hyperowl  # noqa: E402
import hyperowl.batch  # noqa: E402
from hyperowl.data.synthetic import generate_split  # noqa: E402

STAGES = ("read", "decode", "model", "write")


def make_data(folder: Path, n: int) -> Path:
    n_multi, n_video = round(0.3 * n), round(0.2 * n)
    return generate_split(folder, "test", n - n_multi - n_video, n_multi, n_video, seed=0)


def measure(data: Path, out: Path, **kw) -> dict:
    """One run into a fresh output. items/s: over the whole run (local: the model is loaded before);
    steady items/s (Ray): after the first rows arrived, i.e. without the actors' start and model load."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    s = hyperowl.batch.run(data, out, progress=False, **kw)
    wall = time.perf_counter() - t0
    n = s["answered"] + s["failed"]
    row = {"items": n, "failed": s["failed"], "wall_s": wall, "items_per_s": n / wall,
           "seconds": s["seconds"], "per_item_ms": {k: 1e3 * v / max(1, n) for k, v in s["seconds"].items()}}
    if s.get("first_rows_seconds") is not None:
        row["first_rows_s"] = s["first_rows_seconds"]
        row["steady_items_per_s"] = (n - s["first_rows"]) / max(1e-9, s["wall_seconds"] - s["first_rows_seconds"])
    return row


def scaling(per_item_ms: dict, machines: list[int], cores: int, replicas: int) -> list[dict]:
    r, d, m, w = (per_item_ms[k] / 1e3 for k in STAGES)
    rows = []
    for n in machines:
        bounds = {"model": n * replicas / m if m else float("inf"), "decode": n * cores / d if d else float("inf"),
                  "driver": 1 / (r + w) if r + w else float("inf")}
        which = min(bounds, key=bounds.get)
        rows.append({"machines": n, "items_per_s": bounds[which], "bound": which})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200, help="generated records (the stated run: 2000)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=2, help="Ray model actors on this machine")
    ap.add_argument("--no-ray", action="store_true", help="local path only")
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local process and of each Ray actor "
                    "(default 1: on a shared 2-core machine 2 threads ran the model 10x slower)")
    ap.add_argument("--machines", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--cores", type=int, default=16, help="decoding cores per machine in the scaling model")
    ap.add_argument("--replicas-per-machine", type=int, default=8, help="model replicas per machine (GPUs) in the "
                    "scaling model")
    ap.add_argument("--gpu-model-ms", type=float, default=None, help="model ms/item measured on a GPU, for the "
                    "scaling model (default: the model time measured here)")
    ap.add_argument("--keep-data", default=None, help="generate the dataset here (kept) instead of a temp folder")
    ap.add_argument("--out", default="docs/batch.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    folder = Path(a.keep_data) if a.keep_data else Path(tempfile.mkdtemp(prefix="bench-batch-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        data = make_data(folder, a.records)
        gen_s = time.perf_counter() - t
        opts = dict(batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
        torch.set_num_threads(a.threads)
        pipe = hyperowl.load(a.model, device=a.device)
        warm = folder / "warm.jsonl"  # first calls of the kernels, outside the measurement
        warm.write_text("".join(data.read_text().splitlines(keepends=True)[: a.batch_size]))
        measure(warm, folder / "warm_out.jsonl", model=pipe, **opts)
        pipe = hyperowl.Pipeline(pipe.model, pipe.processor, family=pipe.family, feature_cache_mb=512)  # cold cache
        rows = [{"mode": "local", **measure(data, folder / "local.jsonl", model=pipe, **opts)}]
        opts["model"] = a.model
        if not a.no_ray:
            import ray

            cpus = os.cpu_count() or 2
            t = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            start_s = time.perf_counter() - t
            per = max(0.5, (cpus - 1) / a.replicas)  # leave a core to the decoding tasks
            per = min(per, a.threads)  # an actor runs torch on int(per) (at least 1) threads
            res = measure(data, folder / "ray.jsonl", ray="auto", replicas=a.replicas, cpus_per_replica=per, **opts)
            ray.shutdown()
            rows.append({"mode": f"ray x{a.replicas}", "ray_init_s": start_s, "cpus_per_replica": per, **res})
            local = {r["id"]: r["answer"] for r in map(json.loads, (folder / "local.jsonl").read_text().splitlines())}
            remote = {r["id"]: r["answer"] for r in map(json.loads, (folder / "ray.jsonl").read_text().splitlines())}
            rows[-1]["answers_equal_local"] = local == remote
    finally:
        if not a.keep_data:
            shutil.rmtree(folder, ignore_errors=True)

    split = dict(rows[0]["per_item_ms"])
    if a.gpu_model_ms is not None:
        split["model"] = a.gpu_model_ms
    scale = scaling(split, a.machines, a.cores, a.replicas_per_machine)
    print(f"dataset: {a.records} synthetic records (50% single image, 30% multi-image, 20% 8-frame videos), "
          f"generated in {gen_s:.1f} s; batch {a.batch_size}, max {a.max_new_tokens} new tokens, {a.device}")
    print(f"{'mode':<10} {'items':>6} {'items/s':>8} {'steady':>7} {'wall s':>7}  "
          + "  ".join(f"{k + ' ms/it':>14}" for k in STAGES))
    for r in rows:
        steady = r.get("steady_items_per_s", r["items_per_s"])
        print(f"{r['mode']:<10} {r['items']:>6} {r['items_per_s']:>8.2f} {steady:>7.2f} {r['wall_s']:>7.1f}  "
              + "  ".join(f"{r['per_item_ms'][k]:>14.2f}" for k in STAGES))
    print(f"\nscaling model ({a.cores} decoding cores and {a.replicas_per_machine} replicas per machine, model "
          f"{split['model']:.1f} ms/item{' (GPU)' if a.gpu_model_ms is not None else ' (measured here)'}):")
    print(f"{'machines':>8} {'items/s':>10}  bound")
    for s in scale:
        print(f"{s['machines']:>8} {s['items_per_s']:>10.1f}  {s['bound']}")
    result = {"dataset": {"records": a.records, "mix": {"single": 0.5, "multi": 0.3, "video": 0.2}, "seed": 0,
                          "image_size": 64, "video_frames": 8},
              "config": {"batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens, "device": a.device,
                         "model": a.model or "embedded owl3-synthetic", "torch_threads": a.threads},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "rows": rows, "scaling": {"per_item_ms": split, "cores": a.cores,
                                        "replicas_per_machine": a.replicas_per_machine, "rows": scale}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
