"""Training checkpoints: the model in its family's official layout plus what an exact resume needs.

Design note. `output/checkpoint-STEP/` holds config.json + model.safetensors written by
`hyperowl.checkpoint.save_checkpoint` (the family's official layout, LoRA merged in, so `hyperowl.load`
and the official loaders read it), the run's tokenizer.json, and `trainer_state/`: the optimizer moments
as safetensors, the step, the parameter groups, the CPU RNG state and the LoRA adapters. No pickle. A
checkpoint is written under a temporary name and renamed, so a kill mid-save never leaves a half
checkpoint under the real name. A sharded (FSDP2) model is gathered by every rank and saved by rank 0,
model weights only (resuming FSDP runs is not supported). `restore` puts a checkpoint back into a
freshly built model and optimizer; `export_final` copies the loadable part to `output/final`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import load_any, save_checkpoint
from .recipe import Recipe

EXPORTED = ("config.json", "model.safetensors", "tokenizer.json")


def merged_lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters with every LoRA adapter merged into its base weight, under the plain names."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.merge()
    merged = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for m in layers:
        m.unmerge()
    return merged


def _copy_tokenizer(tok_file: Path | None, d: Path) -> None:
    if tok_file is not None and tok_file.exists():
        shutil.copy(tok_file, d / "tokenizer.json")


def save_training_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, out: Path,
                             tok_file: Path | None, lora: bool, recipe: Recipe) -> Path:
    """`out/checkpoint-STEP`: the model (official layout) + tokenizer + trainer_state, written atomically."""
    d = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = tmp / "trainer_state"
    state.mkdir(parents=True)
    if lora:  # the official layout gets the merged weights; the adapters are kept for resuming
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}, str(state / "adapters.safetensors"))
        save_checkpoint(model, tmp, params=merged_lora_params(model))
    else:
        save_checkpoint(model, tmp)
    _copy_tokenizer(tok_file, tmp)
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()} | {"rng": torch.get_rng_state()}, str(state / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    (state / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, "recipe": recipe.to_dict()}, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # atomic: a kill mid-save never leaves a half checkpoint under the real name
    return d


def checkpoint(model, opt, step, out, tok_file, lora, recipe, rank, sharded) -> Path:
    """Save on rank 0; a sharded (FSDP2) model is first gathered by all ranks (model weights only)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        d = out / f"checkpoint-{step}"
        if rank == 0:
            save_checkpoint(model, d, params=full)
            _copy_tokenizer(tok_file, d)
        return d
    if rank == 0:
        return save_training_checkpoint(model, opt, step, out, tok_file, lora, recipe)
    return out / f"checkpoint-{step}"


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    return steps[-1][1] if steps else None


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, ckpt: Path, lora: bool) -> int:
    """Weights (or the LoRA adapters), optimizer state and RNG state from `ckpt`; returns its step."""
    state = ckpt / "trainer_state"
    meta = json.loads((state / "state.json").read_text())
    if lora:
        adapters = load_file(str(state / "adapters.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in adapters.items():
                params[k].copy_(v)
    else:
        loaded = load_any(ckpt, dtype=torch.float32, device="cpu")
        src = dict(loaded.named_parameters())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(src[n].to(p.device))
    tensors = load_file(str(state / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng"))
    st: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        i, name = k.split(".", 1)
        st.setdefault(int(i), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": st, "param_groups": groups})
    return meta["step"]


def export_final(ckpt: Path, out: Path) -> Path:
    """`out/final`: the loadable part of `ckpt` (config, weights, tokenizer), replacing any earlier export."""
    export = out / "final"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir()
    for name in EXPORTED:
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, export / name)
    return export
