"""Where a training step's time goes (data, forward, backward, optimizer), with data.workers settings side by side.

Builds the recipe's model (`hyperowl.train.build.build`), reads its training data the way the trainer does
(`StepBatches` through `step_loader`), and times each phase of each step. The workers settings run in
alternating blocks over the *same* steps' batches (block b: steps b*N .. b*N+N-1 for every setting, the
order of settings flipped every block), so the ratios compare like with like on a noisy CPU. The first step
of a block is not timed (DataLoader start-up). The step is the trainer's with `loss_weighting: token`
(forward, answer-token cross-entropy, backward, gradient clipping, the recipe's AdamW); one micro-batch per
step, on CPU.

    python bench/bench_train_step.py                                   # recipes/embedded.yaml, workers 0,1
    python bench/bench_train_step.py --recipe my.yaml --workers 0,2 --steps 20 --blocks 4

Needs the recipe's data (for the default: bash scripts/train_embedded.sh, or its `data synth` line) and, for
a recipe that trains its tokenizer, a tokenizer.json (--tokenizer; default: the embedded model's).
Writes a JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hyperowl.errors import InputError  # noqa: E402
from hyperowl.train.data import ConversationDataset, StepBatches, step_loader  # noqa: E402
from hyperowl.train.recipe import Recipe, resolve_trainable  # noqa: E402
from hyperowl.families import family_of  # noqa: E402
from hyperowl.train.build import build  # noqa: E402
from hyperowl.train.losses import answer_losses, expand_labels  # noqa: E402
from hyperowl.train.optim import recipe_optimizer  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")


def run_block(model, opt, trainable, data, recipe: Recipe, pad: int, lengths, start: int, steps: int, workers: int,
              clip: float) -> list[dict[str, float]]:
    """Time steps start .. start+steps-1 (the first untimed) with `workers` loader processes."""
    loader = iter(step_loader(StepBatches(data, start, start + steps, recipe.seed, recipe.batch_size, 1, 0, 1,
                                          lengths, recipe.data.group_by_length, pad), workers))
    out = []
    for k in range(steps):
        t0 = time.perf_counter()
        b = next(loader)
        if "error" in b:
            raise InputError(b["error"])
        b = expand_labels(model, b)
        t1 = time.perf_counter()
        loss = answer_losses(model, b, "cpu").sum() / (b["labels"][:, 1:] != -100).sum().clamp(min=1)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if k:  # the first step of a block waits for the loader to start
            out.append({"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3,
                        "tokens": int(b["attention_mask"].sum())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes/embedded.yaml"))
    ap.add_argument("--tokenizer", default=str(ROOT / "hyperowl/assets/owl3-synthetic/tokenizer.json"),
                    help="used when the recipe trains its tokenizer (init.tokenizer: train); 'train': train it here")
    ap.add_argument("--workers", default="0,1", help="data.workers settings to compare, comma-separated")
    ap.add_argument("--steps", type=int, default=12, help="steps per block (the first is not timed)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"))
    a = ap.parse_args()
    try:
        settings = [int(x) for x in a.workers.split(",")]
        if any(w < 0 for w in settings) or a.steps < 2 or a.blocks < 1:
            raise ValueError
    except ValueError:
        sys.exit(f"--workers {a.workers!r} --steps {a.steps} --blocks {a.blocks}: expected workers like 0,1 (>= 0), "
                 "steps >= 2, blocks >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # as the trainer does on CPU
    try:
        recipe = Recipe.from_yaml(a.recipe)
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_step_")  # removed at exit
        recipe.output = tmp.name  # build() writes the tokenizer there; nothing else is saved
        if recipe.init.tokenizer == "train" and a.tokenizer != "train":
            if not Path(a.tokenizer).is_file():
                sys.exit(f"--tokenizer {a.tokenizer}: no such file (the recipe trains its tokenizer; give one)")
            recipe.init.tokenizer = a.tokenizer
        for path, what in ((recipe.data.train, "data.train"), (recipe.init.vision, "init.vision")):
            if path and not Path(path).exists():
                sys.exit(f"{what} {path}: not found (for the default recipe run bash scripts/train_embedded.sh first)")
        torch.manual_seed(recipe.seed)
        model, processor, _ = build(recipe, torch.device("cpu"))
        model.decoder.activation_checkpointing = recipe.activation_checkpointing
        family = family_of(model)
        opt = recipe_optimizer(model, recipe, resolve_trainable(recipe.trainable, family.model_type))
        if opt is None:
            sys.exit(f"{a.recipe}: nothing to train (all parts frozen)")
        trainable = [p for g in opt.param_groups for p in g["params"]]
        rows = family.llm_rows_per_image(model.config)
        data = ConversationDataset(recipe.data.train, processor, recipe.data.on_error, recipe.data.max_frames,
                                   recipe.data.cut, recipe.data.max_length, rows_per_image=rows)
        lengths = data.lengths() if recipe.data.group_by_length > 0 else None
        pad = family.pad_id(processor.tokenizer, model.config)
        model.train()
        times: dict[int, list[dict[str, float]]] = {w: [] for w in settings}
        for blk in range(a.blocks):
            order = settings if blk % 2 == 0 else settings[::-1]
            for w in order:
                times[w] += run_block(model, opt, trainable, data, recipe, pad, lengths, blk * a.steps, a.steps, w,
                                      recipe.optim.grad_clip or 1e9)
                print(f"block {blk + 1}/{a.blocks} workers {w}: done", file=sys.stderr)
    except InputError as e:
        sys.exit(f"error: {e}")
    rows_out = []
    base = None
    for w in settings:
        med = {ph: 1000 * statistics.median(t[ph] for t in times[w]) for ph in PHASES}
        step = 1000 * statistics.median(sum(t[ph] for ph in PHASES) for t in times[w])
        base = step if base is None else base
        rows_out.append({"workers": w, "steps_timed": len(times[w]), **{f"{ph}_ms": med[ph] for ph in PHASES},
                         "step_ms": step, "step_vs_first": step / base,
                         "tokens_per_step": statistics.mean(t["tokens"] for t in times[w])})
    print(f"\n{Path(a.recipe).name}: batch {recipe.batch_size}, {torch.get_num_threads()} threads, median ms per step "
          f"({a.blocks} blocks x {a.steps - 1} timed steps per setting, same batches)")
    print(f"{'workers':>7} " + " ".join(f"{ph:>9}" for ph in PHASES) + f" {'step':>8} {'ratio':>6}")
    for r in rows_out:
        print(f"{r['workers']:>7} " + " ".join(f"{r[ph + '_ms']:>9.1f}" for ph in PHASES)
              + f" {r['step_ms']:>8.1f} {r['step_vs_first']:>6.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"recipe": a.recipe, "batch_size": recipe.batch_size,
                                       "threads": torch.get_num_threads(), "steps": a.steps, "blocks": a.blocks,
                                       "rows": rows_out}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
