"""Training throughput: one process with all the threads against data-parallel processes (torchrun), side by side.

On a small model a CPU core is not kept busy by one process's intra-op threads; several processes of fewer threads
each (DDP over gloo: the same global batch and gradient, `hyperowl.train.trainer`) can step faster.
scripts/train_embedded.sh trains the drawn recipe so. This runs `hyperowl train` for a few steps of the recipe
on each data file in each setting, alternating the settings' order block by block (a noisy CPU then favours
neither), and reports seconds per step from the run's own log (steps after the first `--skip` only: start-up,
tokenizer and the first batches are not counted).

    python bench/bench_train_procs.py                      # recipes/embedded-drawn.yaml on data/synth and data/synth-video
    python bench/bench_train_procs.py --data my.jsonl --procs 2 --steps 20 --blocks 1

Needs the data files (`bash scripts/train_embedded.sh` writes the defaults). The tower is the recipe's stage-0
tower when it exists (else a random one: the same shapes, hence the same cost). Writes a JSON (--out) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def seconds_per_step(recipe: dict, data: str, procs: int, threads: int, steps: int, skip: int, tmp: Path) -> float:
    out = tmp / f"run-{procs}"
    r = {k: v for k, v in recipe.items() if k != "phases"}
    r.update(output=str(out), log_every=1, save_every=0, num_threads=threads)
    r["data"] = {**r["data"], "train": data}
    r["data"].pop("val", None)
    r["optim"] = {**r["optim"], "max_steps": steps, "warmup_steps": 1}
    path = tmp / f"recipe-{procs}.yaml"
    path.write_text(yaml.safe_dump(r))
    cli = ["-m", "hyperowl.cli", "train", str(path), "--overwrite"]
    cmd = [sys.executable, *cli] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    t = [(x["step"], x["time"]) for x in rows if x["step"] > skip]
    return (t[-1][1] - t[0][1]) / (t[-1][0] - t[0][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes/embedded-drawn.yaml"))
    ap.add_argument("--data", nargs="+", default=[str(ROOT / "data/synth/train.jsonl"),
                                                  str(ROOT / "data/synth-video/train.jsonl")])
    ap.add_argument("--tokenizer", default=str(ROOT / "hyperowl/assets/owl3-synthetic/tokenizer.json"),
                    help="for a recipe that trains its tokenizer (timing only: any tokenizer of the world will do; "
                         "'train': train it as the recipe says, in every run)")
    ap.add_argument("--procs", type=int, default=2, help="data-parallel processes against one")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads in all, in each setting")
    ap.add_argument("--steps", type=int, default=40, help="steps per run")
    ap.add_argument("--skip", type=int, default=5, help="first steps of a run not timed")
    ap.add_argument("--blocks", type=int, default=2, help="runs of each setting per data file (order flipped)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_procs.json"))
    a = ap.parse_args()
    files = [(a.recipe, "--recipe")] + ([(a.tokenizer, "--tokenizer")] if a.tokenizer != "train" else [])
    for p, what in files + [(d, "--data") for d in a.data]:
        if not Path(p).is_file():
            sys.exit(f"{what} {p}: no such file (the default data comes from scripts/train_embedded.sh)")
    if a.procs < 2 or a.cores < a.procs or a.steps < a.skip + 2:
        sys.exit(f"--procs {a.procs}, --cores {a.cores}, --steps {a.steps}: need procs >= 2, cores >= procs and "
                 f"steps >= skip + 2")
    recipe = yaml.safe_load(Path(a.recipe).read_text())
    init = dict(recipe["init"])
    if init.get("tokenizer") == "train" and a.tokenizer != "train":
        init["tokenizer"] = a.tokenizer
    if init.get("vision") and not (ROOT / init["vision"]).is_dir():
        init.pop("vision")
    recipe["init"] = init
    settings = [(1, a.cores), (a.procs, a.cores // a.procs)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in a.data:
            times: dict[int, list[float]] = {p: [] for p, _ in settings}
            for b in range(a.blocks):
                for procs, threads in (settings if b % 2 == 0 else settings[::-1]):
                    times[procs].append(seconds_per_step(recipe, data, procs, threads, a.steps, a.skip, Path(tmp)))
            one = statistics.median(times[1])
            for procs, threads in settings:
                s = statistics.median(times[procs])
                results.append({"data": data, "procs": procs, "threads_each": threads, "s_per_step": round(s, 4),
                                "runs": [round(x, 4) for x in times[procs]], "speedup": round(one / s, 3)})
    print(f"{'data':40s} {'setting':>16s} {'s/step':>8s} {'speedup':>8s}")
    for r in results:
        print(f"{Path(r['data']).parent.name + '/' + Path(r['data']).name:40s} "
              f"{str(r['procs']) + ' x ' + str(r['threads_each']) + ' threads':>16s} {r['s_per_step']:8.3f} "
              f"{r['speedup']:7.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"recipe": a.recipe, "steps": a.steps, "skip": a.skip, "blocks": a.blocks,
                                       "cores": a.cores, "results": results}, indent=2) + "\n")
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
