"""The training loop: one process or many (torchrun), phases, exact resume, metrics log.

Design note. One optimizer step consumes a global batch of `batch_size * grad_accum` examples whose
indices are a pure function of (seed, step), split evenly over the processes. The loss is the sum of
token losses divided by the number of target tokens in the whole global batch (counted across micro
batches and processes before any backward; see losses.py), so a 2-process run computes the same
gradient as a 1-process run with the same global batch. Multi-process runs wrap the model in DDP
(gradients averaged, hence the loss is scaled by the world size) or, with `--fsdp`, shard it with FSDP2
per decoder layer.

A run is: build the model (build.py: four init routes, any family), choose what trains (LoRA, the
recipe's parts), distribute it, resume from the last checkpoint (checkpointing.py), then steps. Each
step draws its micro batches, aligns their labels with the sequence the logits cover
(`losses.expand_labels`: Owl2 puts each image's Q + 1 rows into the LLM sequence), normalises over the
global batch, runs forward/backward per micro batch and steps the optimizer. Rank 0 logs to
`output/log.jsonl` (`hyperowl plot-log` draws it) and saves `output/checkpoint-STEP/`; the final
model is exported to `output/final`. Whatever differs between model families is asked of the family
table (`hyperowl.families`): parts defaults by model_type, processor, pad id, rows per image, saving.

A recipe with `phases` runs them in order in one output directory (one sub-directory per phase, each
phase starting from the last one's model); the process group lives across the phases.

One run per output directory: a directory that holds a run is continued only with `--resume` (its log cut
back to the resumed step, so no step is logged twice) or replaced with `--overwrite`, never mixed with a
new run. SIGTERM (a scheduler's pre-emption, `kill`, torchrun passing it on) finishes the current step,
saves a checkpoint on every process's agreement (a one-number all-reduce per step) and exits with 143;
`--resume` then continues exactly (checkpointing.py). A start banner (logger `hyperowl.train.banner`,
shown by the CLI) says which parts train with their parameter counts, where the run starts and the
effective batch. Metrics also go to TensorBoard or W&B with `logger:` (optional extras, imported lazily).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import InputError
from ..families import Family, family_of
from .build import build, init_weights, make_processor, on_rank0
from .checkpointing import checkpoint, export_final, latest_checkpoint, restore, restore_rng
from .data import ConversationDataset, StepBatches, read_records, step_loader
from .lora import apply_lora
from .losses import (answer_counts, answer_losses, expand_labels, label_positions, row_losses, step_normalisers,
                     validation_loss, weighted_loss)
from .optim import lr_at, part_of, recipe_optimizer, set_lr
from .recipe import LOSS_WEIGHTING, Recipe, resolve_trainable
from .tokenizer import OWL2_SPECIAL_TOKENS, SPECIAL_TOKENS, train_tokenizer, with_image_token

log = logging.getLogger(__name__)
banner = logging.getLogger("hyperowl.train.banner")  # the start banner: the CLI shows it (INFO) without --debug
SIGTERM_EXIT = 128 + signal.SIGTERM  # the exit status of a run stopped by SIGTERM after saving a checkpoint

# Names that callers have imported from here since before the split (their homes: the modules above).
__all__ = ["train", "build", "init_weights", "make_processor", "on_rank0", "expand_labels", "answer_losses",
           "label_positions", "row_losses", "validation_loss", "recipe_optimizer", "train_tokenizer",
           "with_image_token", "SPECIAL_TOKENS", "OWL2_SPECIAL_TOKENS"]


# -- phases ---------------------------------------------------------------------------------------------------
def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None, fsdp: bool = False,
          overwrite: bool = False) -> Path:
    """Run the recipe (its phases in order, if it has any). Returns the output directory (final model under
    output/final). An output directory holding a run is continued with `resume` or replaced with `overwrite`,
    else refused. stop_after: a testing aid, die like a killed job after that many steps (all phases counted).
    A SIGTERM saves a checkpoint and exits with SIGTERM_EXIT (module note)."""
    try:
        return _train(recipe, resume, stop_after, fsdp, overwrite)
    finally:
        torch.set_flush_denormal(False)  # process-wide float state (set for the run on CPU): give it back


def _train(recipe: Recipe, resume: bool, stop_after: int | None, fsdp: bool, overwrite: bool) -> Path:
    if resume and overwrite:
        raise InputError("--resume continues the run in the output directory, --overwrite replaces it: pass one")
    rank, world = _rank_and_world()
    _init_process_group(world)  # up front: the processes wait for rank 0's clean-up below
    _check_logger(recipe)
    _claim_output(recipe, resume, overwrite, rank, world)
    if not recipe.phases:
        return _train_run(recipe, resume, stop_after, fsdp)
    phases = recipe.phase_recipes()
    out = Path(recipe.output)
    checked = _check_phase_data(phases)
    done = 0
    for k, phase in enumerate(phases, 1):
        finished = (Path(phase.output) / "final" / "config.json").is_file()
        if resume and finished:  # a phase is done once its final model is exported
            log.info("phase %d/%d: done before, skipped (%s)", k, len(phases), phase.output)
        else:
            if rank == 0 and (finished or (not resume and Path(phase.output).exists())):
                shutil.rmtree(phase.output)  # a new run: never continue a previous run's phase
            if world > 1:
                dist.barrier()
            log.info("phase %d/%d: %d steps -> %s", k, len(phases), phase.optim.max_steps, phase.output)
            _train_run(phase, resume, None if stop_after is None else stop_after - done, fsdp,
                       last=False, desc=f"train phase {k}/{len(phases)}", checked=checked)
        done += phase.optim.max_steps
        if rank == 0:
            _join_phase_logs(phases, out)
    if rank == 0:
        export = out / "final"
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(Path(phases[-1].output) / "final", export)
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
        _plot_loss(out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


# What a run writes into its output directory (an existing one is a run: --resume or --overwrite).
_RUN_FILES = ("log.jsonl", "recipe.json", "loss.png", "final", "tensorboard", "wandb")
_RUN_GLOBS = ("checkpoint-*", ".tmp-checkpoint-*", ".rng-*", "phase-*")


def _claim_output(recipe: Recipe, resume: bool, overwrite: bool, rank: int, world: int) -> None:
    """One run per output directory (module note). Every process checks before rank 0 deletes anything."""
    out = Path(recipe.output)
    found = [p for p in (out / n for n in _RUN_FILES) if p.exists()] + [p for g in _RUN_GLOBS for p in sorted(out.glob(g))]
    if found and not (resume or overwrite):
        raise InputError(f"output '{out}' already holds a run ({', '.join(p.name for p in found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}): pass --resume to continue it or --overwrite to "
                         f"replace it, or choose another --output")
    if world > 1:
        dist.barrier()
    if found and overwrite and rank == 0:
        tok = out / "tokenizer.json"
        given = recipe.init.tokenizer not in (None, "train") and tok.exists() and Path(recipe.init.tokenizer).resolve() == tok.resolve()
        for p in found + ([tok] if tok.exists() and not given else []):  # a trained tokenizer is the old run's too
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        log.info("--overwrite: removed the previous run in %s", out)
    if world > 1:
        dist.barrier()


def _check_logger(recipe: Recipe) -> None:
    """`logger:` names an optional package: say how to install it before anything trains."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(recipe.logger)
    try:
        if package:
            importlib.import_module(package)
    except ImportError:
        raise InputError(f"recipe: logger: {recipe.logger} needs the '{package}' package, which is not installed: "
                         f"pip install 'hyperowl[{package}]' (or set logger: none)") from None


def _check_phase_data(phases: list[Recipe]) -> dict:
    """Every phase's data, checked before anything trains (a bad path in phase 9 must not cost phases 1-8),
    once per file; returns the reads, which the phases' datasets reuse."""
    checked: dict = {}
    for k, phase in enumerate(phases, 1):
        try:
            read_records(phase.data.train, phase.data.on_error, checked=checked)
        except InputError as e:
            raise InputError(f"recipe: phase {k}: {e}") from None
    return checked


def _join_phase_logs(phases: list[Recipe], out: Path) -> None:
    """<out>/log.jsonl: the phases' logs in order, steps counted across phases, each record with its phase."""
    offset, lines = 0, []
    for k, phase in enumerate(phases, 1):
        f = Path(phase.output) / "log.jsonl"
        if f.is_file():
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                lines.append(json.dumps({**rec, "step": rec["step"] + offset, "phase": k}))
        offset += phase.optim.max_steps
    (out / "log.jsonl").write_text("".join(line + "\n" for line in lines))


def _plot_loss(out: Path) -> None:
    try:
        from .plot import plot_log

        plot_log(out / "log.jsonl", out / "loss.png")
    except ImportError:
        log.info("matplotlib not installed: no loss.png (pip install matplotlib)")


# -- processes ------------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group(world: int) -> None:
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _set_up_process(recipe: Recipe, world: int) -> torch.device:
    """The process group, this process's device and its thread / float settings."""
    _init_process_group(world)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny Adam moments/gradients turn denormal and slow x86 float math ~100x
    if recipe.batch_size % world:
        raise InputError(f"batch_size {recipe.batch_size} must divide by the number of processes {world}")
    return device


# -- one run --------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one run trains, with what, and from which step."""

    model: torch.nn.Module  # the model itself (its weights are what checkpoints save)
    net: torch.nn.Module  # what the forward runs through: the model, or its DDP wrapper
    opt: torch.optim.AdamW
    trainable: list[torch.nn.Parameter]  # the optimizer's parameters (gradient clipping)
    family: Family
    processor: object
    tok_file: Path | None  # the tokenizer.json checkpoints ship
    use_lora: bool
    sharded: bool  # FSDP2
    start: int  # the first step to run (0, or the resumed checkpoint's)
    resumed_from: Path | None  # the checkpoint it resumed from

    @property
    def rows_per_image(self) -> int:
        """Sequence rows each image takes in the LLM (Owl2: Q + 1; Owl3: 1)."""
        return self.family.llm_rows_per_image(self.model.config)

    @property
    def pad_id(self) -> int:
        return self.family.pad_id(self.processor.tokenizer, self.model.config)


def _prepare(recipe: Recipe, device: torch.device, world: int, fsdp: bool, resume: bool, out: Path) -> _Run:
    """Build the model, choose what trains, distribute it and (resume) restore the last checkpoint."""
    model, processor, tok_file = build(recipe, device)
    family = family_of(model)
    model.decoder.activation_checkpointing = recipe.activation_checkpointing
    parts = resolve_trainable(recipe.trainable, family.model_type)
    log.info("training parts: %s", ", ".join(k for k, v in parts.items() if v) or "LoRA adapters only")
    use_lora = recipe.lora.r > 0
    if use_lora:
        apply_lora(model, recipe.lora)
        model.to(device)
    opt = recipe_optimizer(model, recipe, parts)
    if opt is None:
        raise InputError("recipe: nothing to train (all parts frozen and no LoRA)")
    net: torch.nn.Module = model
    sharded = world > 1 and fsdp
    counts = _trainable_counts(model)
    if sharded:  # FSDP2 replaces the parameters by sharded DTensors: build the optimizer groups afterwards
        if use_lora:
            raise InputError("--fsdp: LoRA is not supported with FSDP2 yet; use DDP (no --fsdp)")
        from torch.distributed.fsdp import fully_shard

        for layer in model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = recipe_optimizer(model, recipe, parts)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start = restore(model, opt, ckpt, use_lora, sharded)
        log.info("resumed from %s at step %d", ckpt, start)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    run = _Run(model, net, opt, trainable, family, processor, tok_file, use_lora, sharded, start, ckpt)
    if _rank_and_world()[0] == 0:
        _banner(recipe, counts, ckpt, start, world, resume)
    return run


def _trainable_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Per part (projector, fusion, llm, vision, LoRA adapters): (trainable, all) parameter counts."""
    fusion = set(model.fusion_parameters())
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        part = "LoRA adapters" if "lora_" in name else part_of(name.replace(".base_layer", ""), fusion)
        c = counts.setdefault(part, [0, 0])
        c[0] += p.numel() if p.requires_grad else 0
        c[1] += p.numel()
    return {k: (a, b) for k, (a, b) in counts.items()}


def _banner(recipe: Recipe, counts: dict[str, tuple[int, int]], ckpt: Path | None, start: int, world: int,
            resume: bool) -> None:
    on = sum(a for a, _ in counts.values())
    total = sum(b for k, (_, b) in counts.items() if k != "LoRA adapters")
    parts = ", ".join(f"{k} {a:,}" + ("" if a else " (frozen)") for k, (a, _) in counts.items())
    banner.info("training %s of %s parameters (%.2f%%): %s", f"{on:,}", f"{total:,}", 100 * on / max(total, 1), parts)
    if ckpt is not None:
        banner.info("resuming from %s (step %d of %d)", ckpt, start, recipe.optim.max_steps)
    else:
        banner.info("starting at step 0 of %d%s (init: %s)", recipe.optim.max_steps,
                    " (--resume: no checkpoint yet)" if resume else "",
                    recipe.init.from_ or recipe.init.preset or recipe.init.text_llm)
    per = recipe.batch_size // world
    banner.info("effective batch %d = %d per process x %d process%s x %d accumulation step%s",
                per * world * recipe.grad_accum, per, world, "" if world == 1 else "es", recipe.grad_accum,
                "" if recipe.grad_accum == 1 else "s")


def _datasets(recipe: Recipe, run: _Run, rank: int, checked: dict | None):
    """The training set, and on rank 0 the validation set when the recipe evaluates (else None)."""
    d, rows = recipe.data, run.rows_per_image
    data = ConversationDataset(d.train, run.processor, d.on_error, d.max_frames, d.cut, d.max_length,
                               rows_per_image=rows, checked=checked)
    val = None
    if d.val and recipe.eval_every and rank == 0:
        val = ConversationDataset(d.val, run.processor, "skip", d.max_frames, d.cut, d.max_length,
                                  rows_per_image=rows, checked=checked)
    return data, val


@dataclass
class _StepResult:
    loss: float  # the weighted objective over the global batch
    token_loss: float  # the plain per-token loss over the global batch
    grad_norm: torch.Tensor | None  # before clipping (None: no clipping)
    tokens: int  # sequence tokens this process ran (Owl2: image rows included)


def _next_micro_batches(batches, run: _Run, grad_accum: int) -> list[dict]:
    """This process's micro batches of the next step, labels aligned with the logits' sequence."""
    micro = [next(batches) for _ in range(grad_accum)]
    bad = next((b["error"] for b in micro if "error" in b), None)
    if bad is not None:
        raise InputError(bad)
    return [expand_labels(run.model, b) for b in micro]


def _optimizer_step(run: _Run, micro: list[dict], power: float, world: int, device: torch.device, autocast,
                    grad_clip: float | None) -> _StepResult:
    """Forward/backward of every micro batch (gradients summed, DDP-synchronised on the last), then the update."""
    # Per-row answer tokens; a row's tokens weigh rows_n ** -power; the normaliser is the global sum of the
    # weights, so N processes compute the gradient of one (power 0: the mean over all answer tokens).
    rows_n = answer_counts(micro)
    n_tok, norm = step_normalisers(rows_n, power, world)
    ddp = isinstance(run.net, torch.nn.parallel.DistributedDataParallel)
    rows = run.rows_per_image
    loss_sum = torch.zeros((), dtype=torch.float64)
    tok_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for m, b in enumerate(micro):
        sync = m == len(micro) - 1 or not ddp
        with (contextlib.nullcontext() if sync else run.net.no_sync()), autocast:
            row = answer_losses(run.net, b, device)  # [B]: summed over each row's answer tokens
            tok_loss = row.sum()
            obj = tok_loss if power == 0 else weighted_loss(row, rows_n[m], power)
        (obj / norm.clamp(min=1).to(obj) * world).backward()  # DDP and FSDP average gradients over processes
        loss_sum += obj.detach().cpu().double()
        tok_sum += tok_loss.detach().cpu().double()
        tokens += int(b["attention_mask"].sum())
        if b["image_positions"] is not None and rows > 1:  # Owl2: the images' rows are sequence tokens too
            tokens += int((b["image_positions"] >= 0).sum()) * (rows - 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, grad_clip) if grad_clip else None
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(tok_sum)
    return _StepResult(float(loss_sum / norm.clamp(min=1)), float(tok_sum / n_tok.clamp(min=1)), grad_norm, tokens)


class _MetricsLog:
    """output/log.jsonl, written by rank 0: loss, LR, gradient norm, throughput (and validation loss)."""

    def __init__(self, path: Path, rank: int, world: int, start: int = 0, logger: str = "none", recipe=None):
        self.f = None
        self.external = None
        if rank == 0:  # a resumed run continues the log after its checkpoint's step: no step twice
            kept = [line for line in (path.read_text().splitlines() if path.is_file() else [])
                    if line.strip() and json.loads(line)["step"] <= start]
            path.write_text("".join(line + "\n" for line in kept))
            self.f = path.open("a")
            self.external = _external_logger(logger, path.parent, start, recipe)
        self.world = world
        self.t_last, self.tokens = time.perf_counter(), 0

    def write(self, step: int, res: _StepResult, lr: float, weighted: bool, val_loss=None) -> dict:
        """One record; `val_loss` (a function, or None) is computed after the throughput is measured."""
        now = time.perf_counter()
        rec = {"step": step, "loss": res.loss, **({"token_loss": res.token_loss} if weighted else {}), "lr": lr,
               "grad_norm": None if res.grad_norm is None else float(res.grad_norm),
               "tokens_per_s": self.tokens * self.world / max(now - self.t_last, 1e-9), "time": time.time()}
        self.t_last, self.tokens = now, 0
        if val_loss is not None:
            rec["val_loss"] = val_loss()
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.external is not None:
            self.external.log({k: v for k, v in rec.items() if k not in ("step", "time") and v is not None}, step)
        return rec

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.external is not None:
            self.external.close()


class _TensorBoard:
    def __init__(self, out: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.w.add_scalar(f"train/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _Wandb:
    """W&B run in `output/wandb` (project: $WANDB_PROJECT, default hyperowl; WANDB_MODE=offline works offline)."""

    def __init__(self, out: Path, recipe):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hyperowl"), dir=str(out), name=out.name,
                              config=recipe.to_dict() if recipe is not None else None)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _external_logger(kind: str, out: Path, start: int, recipe):
    if kind == "tensorboard":
        return _TensorBoard(out, start)
    if kind == "wandb":
        return _Wandb(out, recipe)
    return None


class _Preemption:
    """SIGTERM while training: remembered, acted on after the step (all processes agree; module note)."""

    def __init__(self):
        self.flag = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame) -> None:
        self.flag = True

    def requested(self, world: int, device: torch.device) -> bool:
        if world == 1:
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _train_run(recipe: Recipe, resume: bool, stop_after: int | None, fsdp: bool, last: bool = True,
               desc: str = "train", checked: dict | None = None) -> Path:
    """One training run (a recipe without phases, or one phase). last=False keeps the process group up."""
    rank, world = _rank_and_world()
    device = _set_up_process(recipe, world)
    torch.manual_seed(recipe.seed)  # and Python's and NumPy's, which a resume restores with torch's
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    run = _prepare(recipe, device, world, fsdp, resume, out)
    if rank == 0:
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    data, val = _datasets(recipe, run, rank, checked)
    pad = run.pad_id
    total, group = recipe.optim.max_steps, recipe.data.group_by_length
    workers = recipe.data.workers if recipe.data.workers is not None else (4 if device.type == "cuda" else 0)
    batches = iter(step_loader(StepBatches(data, run.start, total, recipe.seed, recipe.batch_size, recipe.grad_accum,
                                           rank, world, data.lengths() if group > 0 else None, group, pad), workers))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if recipe.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    power = LOSS_WEIGHTING[recipe.loss_weighting]
    metrics = _MetricsLog(out / "log.jsonl", rank, world, run.start, recipe.logger, recipe)
    bar = tqdm(total=total, initial=run.start, desc=desc, disable=rank != 0, dynamic_ncols=True)
    run.model.train()
    if run.resumed_from is not None:  # last: building the data above may draw random numbers
        restore_rng(run.resumed_from, rank)
    preempt = _Preemption()
    try:
        _steps(recipe, run, batches, val, metrics, bar, preempt, power, autocast, rank, world, device, stop_after, out)
    finally:
        preempt.close()
    bar.close()
    final = checkpoint(run.model, run.opt, total, out, run.tok_file, run.use_lora, recipe, rank, run.sharded, world)
    metrics.close()
    if rank == 0:
        export_final(final, out)
        _plot_loss(out)
    if world > 1:
        dist.barrier()  # the next phase (or the caller) reads this run's final model
        if last:
            dist.destroy_process_group()
    return out


def _steps(recipe, run, batches, val, metrics, bar, preempt, power, autocast, rank, world, device, stop_after, out):
    """The optimizer steps from run.start to the end (a SIGTERM: checkpoint and exit)."""
    total, pad = recipe.optim.max_steps, run.pad_id
    for step in range(run.start, total):
        lr = lr_at(step, recipe.optim.lr, recipe.optim.warmup_steps, total, recipe.optim.min_lr_ratio)
        set_lr(run.opt, lr)
        micro = _next_micro_batches(batches, run, recipe.grad_accum)
        res = _optimizer_step(run, micro, power, world, device, autocast, recipe.optim.grad_clip)
        metrics.tokens += res.tokens
        done = step + 1
        bar.update(1)
        if rank == 0 and (done % recipe.log_every == 0 or done == total or done == run.start + 1):
            evaluate = val is not None and (done % recipe.eval_every == 0 or done == total)
            rec = metrics.write(done, res, lr, weighted=power != 0,
                                val_loss=(lambda: _validate(run, val, pad, device, recipe.batch_size)) if evaluate else None)
            bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        saved = recipe.save_every and done % recipe.save_every == 0 and done < total
        if saved:
            checkpoint(run.model, run.opt, done, out, run.tok_file, run.use_lora, recipe, rank, run.sharded, world)
        if done < total and preempt.requested(world, device):
            if not saved:
                checkpoint(run.model, run.opt, done, out, run.tok_file, run.use_lora, recipe, rank, run.sharded, world)
            metrics.close()
            bar.close()
            log.warning("SIGTERM: saved %s at step %d of %d; continue with --resume", out / f"checkpoint-{done}", done,
                        total)
            if world > 1:
                dist.destroy_process_group()
            raise SystemExit(SIGTERM_EXIT)
        if stop_after is not None and done >= stop_after:  # testing aid: die like a killed job
            os._exit(3)


def _validate(run: _Run, val: ConversationDataset, pad: int, device: torch.device, batch_size: int) -> float:
    loss = validation_loss(run.model, val, pad, device, batch_size)
    run.model.train()
    return loss
