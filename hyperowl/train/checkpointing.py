"""Training checkpoints: the model in its family's official layout plus what an exact resume needs.

Design note. `output/checkpoint-STEP/` holds config.json + model.safetensors written by
`hyperowl.checkpoint.save_checkpoint` (the family's official layout, LoRA merged in, so `hyperowl.load`
and the official loaders read it), the run's tokenizer files (`interop.write_tokenizer_files`), and
`trainer_state/`: the optimizer moments as safetensors, the step, the parameter groups, each process's
RNG states (torch CPU and CUDA, Python `random`, NumPy; `rng/rank-R.safetensors`), and under LoRA the
adapters plus every other trainable parameter (`trainable.safetensors`: projector, visual K/V, ... under
instruct the norms, embeddings and tower), because the merged official weights cannot be split back into
base + adapter. The data order needs no state: a step's examples are a pure function of (seed, step).
No pickle. A checkpoint is written under a temporary name and renamed, so a kill mid-save never leaves a
half checkpoint under the real name. A sharded (FSDP2) model and its optimizer are gathered by every rank
(full state dicts) and saved by rank 0; every rank reads them back on resume. `restore` puts a checkpoint
back into a freshly built model and optimizer; `export_final` copies the loadable part to `output/final`;
`rotate` keeps the last K checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import load_any, save_checkpoint
from .interop import TOKENIZER_FILES, write_tokenizer_files
from .recipe import Recipe

log = logging.getLogger(__name__)
EXPORTED = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES)


def merged_lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters with every LoRA adapter merged into its base weight, under the plain names.
    Computed on copies: merging into the model and back (W + BA - BA) would change its base weights by
    rounding at every checkpoint, and a resumed run would then differ from an uninterrupted one."""
    from peft.tuners.lora import LoraLayer

    merged = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                for adapter in m.active_adapters:
                    merged[f"{name}.weight"] += m.get_delta_weight(adapter)
    return merged


def _copy_tokenizer(model: torch.nn.Module, tok_file: Path | None, d: Path) -> None:
    if tok_file is not None and tok_file.exists():
        write_tokenizer_files(model, tok_file, d)


# -- RNG states (one file per process) ------------------------------------------------------------------------
def save_rng(path: Path) -> None:
    """This process's RNG states: torch CPU (+ every CUDA device), Python `random`, NumPy's global generator."""
    path.parent.mkdir(parents=True, exist_ok=True)
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(t["torch"])
    cuda = [t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in t))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(t["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# -- saving ---------------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in osd["state"].items() for k, v in s.items()}
    return tensors, [dict(g) for g in osd["param_groups"]]


def _sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer):
    """Full (gathered) model and optimizer state dicts of an FSDP2 model; a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {f"{fqn}::{k}": v.contiguous() for fqn, s in osd.get("state", {}).items() for k, v in s.items()}
    return msd, tensors, [dict(g) for g in osd.get("param_groups", [])]


def save_training_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, out: Path,
                             tok_file: Path | None, lora: bool, recipe: Recipe, sharded_state=None) -> Path:
    """`out/checkpoint-STEP`: the model (official layout) + tokenizer + trainer_state, written atomically.
    The processes' RNG files, if any, are waiting in `out/.rng-STEP/` and move in."""
    d = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = tmp / "trainer_state"
    state.mkdir(parents=True)
    if sharded_state is not None:  # FSDP2: gathered full state dicts (optimizer keyed by parameter name)
        full, tensors, groups = sharded_state
        save_checkpoint(model, tmp, params=full)
        fmt = "fqn"
    else:
        if lora:  # the official layout gets the merged weights; adapters + other trainable parts kept for resuming
            params = dict(model.named_parameters())
            save_file({n: p.detach().contiguous() for n, p in params.items() if "lora_" in n},
                      str(state / "adapters.safetensors"))
            save_file({n: p.detach().contiguous() for n, p in params.items() if p.requires_grad and "lora_" not in n},
                      str(state / "trainable.safetensors"))
            save_checkpoint(model, tmp, params=merged_lora_params(model))
        else:
            save_checkpoint(model, tmp)
        tensors, groups = _optimizer_tensors(opt)
        fmt = "index"
    _copy_tokenizer(model, tok_file, tmp)
    save_file(tensors, str(state / "optimizer.safetensors"))
    rng = out / f".rng-{step}"
    if rng.is_dir():
        rng.rename(state / "rng")
    (state / "state.json").write_text(json.dumps({"step": step, "optimizer_format": fmt, "param_groups": groups,
                                                  "recipe": recipe.to_dict()}, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # atomic: a kill mid-save never leaves a half checkpoint under the real name
    return d


def checkpoint(model, opt, step, out, tok_file, lora, recipe, rank, sharded, world: int = 1) -> Path:
    """Every process writes its RNG states, a sharded (FSDP2) model and optimizer are gathered by all, rank 0
    saves; all processes return once the checkpoint is complete (a SIGTERM exit may follow)."""
    save_rng(out / f".rng-{step}" / f"rank-{rank}.safetensors")
    sharded_state = _sharded_state(model, opt) if sharded else None
    if world > 1:
        dist.barrier()  # every RNG file is written
    d = out / f"checkpoint-{step}"
    if rank == 0:
        save_training_checkpoint(model, opt, step, out, tok_file, lora, recipe, sharded_state)
        rotate(out, recipe.save_total_limit, keep=d)
    if world > 1:
        dist.barrier()
    return d


def checkpoints(out: Path) -> list[Path]:
    """`out`'s complete checkpoints, oldest first."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    return [p for _, p in steps]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def rotate(out: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the last `limit` checkpoints (0: keep all; `keep` is never deleted). Returns the deleted."""
    if limit <= 0:
        return []
    found = checkpoints(out)
    gone = [p for p in found[:-limit] if p != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
        log.debug("save_total_limit %d: deleted %s", limit, p)
    return gone


# -- restoring ------------------------------------------------------------------------------------------------
def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, ckpt: Path, lora: bool, sharded: bool = False) -> int:
    """Weights (LoRA: the adapters and the other trainable parameters) and optimizer state from `ckpt`; returns
    its step. The RNG states come back separately (`restore_rng`), right before the first step: setting up the
    data (a DataLoader draws its seed) must not consume the restored states."""
    state = ckpt / "trainer_state"
    meta = json.loads((state / "state.json").read_text())
    tensors = load_file(str(state / "optimizer.safetensors"))
    if meta.get("optimizer_format") == "fqn" or sharded:
        _restore_sharded(model, opt, ckpt, tensors, meta["param_groups"])
    else:
        if lora:
            params = dict(model.named_parameters())
            saved = load_file(str(state / "adapters.safetensors"))
            if (state / "trainable.safetensors").is_file():
                saved |= load_file(str(state / "trainable.safetensors"))
            elif any(p.requires_grad and "lora_" not in n for n, p in params.items()):
                log.warning("%s: saved before trainable parts were kept with LoRA; only the adapters are restored", ckpt)
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)
        else:
            loaded = load_any(ckpt, dtype=torch.float32, device="cpu")
            src = dict(loaded.named_parameters())
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(src[n].to(p.device))
        tensors.pop("rng", None)  # checkpoints before per-process RNG files kept the CPU state here
        st: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            i, name = k.split(".", 1)
            st.setdefault(int(i), {})[name] = v
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": st, "param_groups": groups})
    return meta["step"]


def restore_rng(ckpt: Path, rank: int) -> None:
    """This process's RNG states as they were when `ckpt` was saved."""
    rng = ckpt / "trainer_state" / "rng" / f"rank-{rank}.safetensors"
    if rng.is_file():
        load_rng(rng)
    else:
        log.warning("%s: no RNG state for process %d (saved by a run with fewer processes?)", ckpt, rank)


def _restore_sharded(model, opt, ckpt: Path, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Every rank loads the full state dicts and keeps its shards (FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    loaded = load_any(ckpt, dtype=torch.float32, device="cpu")
    msd = {n: p.detach() for n, p in loaded.named_parameters()}
    st: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        fqn, name = k.split("::", 1)
        st.setdefault(fqn, {})[name] = v
    for g in groups:
        g["betas"] = tuple(g["betas"])
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict={"state": st, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))


def export_final(ckpt: Path, out: Path) -> Path:
    """`out/final`: the loadable part of `ckpt` (config, weights, tokenizer), replacing any earlier export."""
    export = out / "final"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir()
    for name in EXPORTED:
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, export / name)
    return export
