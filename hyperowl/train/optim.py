"""Which parameters train, with which learning rate; the LR schedule.

Design note: parameters are sorted into four named parts — `projector`, `fusion` (hyper-attention
visual K/V and gates), `vision` (SigLIP tower), `llm` (everything else of the decoder) — and a recipe
switches parts on or off. The vision tower gets layer-wise LR decay (BEiT style): its top layer trains at
lr * decay, each layer below at one more factor of decay, the patch/position embeddings lowest.
LoRA adapters (when present) always train and belong to the part of the layer they adapt.

mPLUG-Owl2 uses the same four parts: `vision` = the CLIP-style ViT (LR decay over its layers; its
post_layernorm sits above the top layer and trains at the full LR), `projector` = the visual abstractor,
`fusion` = the modality-adaptive module's visual side (every layer's visual RMSNorms and visual K/V,
`...multiway.1`, from `Owl2Model.fusion_parameters`), `llm` = everything else (text norms/K/V, Q, O, MLP,
embeddings, head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.owl3 import Owl3Model
from .recipe import Recipe

PROJECTOR_PREFIXES = ("projector.", "abstractor.")  # Owl3's projection, Owl2's visual abstractor


def part_of(name: str, fusion: set[str]) -> str:
    if name.startswith(PROJECTOR_PREFIXES) or name in fusion:
        return "projector" if name.startswith(PROJECTOR_PREFIXES) else "fusion"
    if name.startswith("vision."):
        return "vision"
    return "llm"


def _clean(name: str) -> str:
    """Parameter name without LoRA/wrapper infixes, to classify adapter weights by the layer they adapt."""
    for infix in (".base_layer", ".lora_A.default", ".lora_B.default"):
        name = name.replace(infix, "")
    return name


def vision_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for vision layer i, num_layers+1 for a norm above the last layer."""
    parts = name.split(".")
    if parts[1] == "layers":
        return int(parts[2]) + 1
    if parts[1] == "post_layernorm":
        return num_layers + 1
    return 0


def param_groups(model: Owl3Model | nn.Module, trainable: dict[str, bool], lr: float, weight_decay: float, layer_decay: float,
                 part_lr: dict[str, float] | None = None) -> list[dict]:
    """Set requires_grad by part and build AdamW groups (no decay on biases/norms; LR decay in the vision tower;
    part_lr multiplies the LR of whole parts, e.g. a from-scratch vision side that must learn faster than the LM)."""
    part_lr = part_lr or {}
    fusion = set(model.fusion_parameters())
    n_vis = len(model.vision.layers)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        clean = _clean(name)
        is_lora = "lora_" in name
        on = is_lora or (trainable.get(part_of(clean, fusion), False) and not getattr(p, "_frozen_base", False))
        p.requires_grad_(on)
        if not on:
            continue
        scale = float(part_lr.get(part_of(clean, fusion), 1.0))
        if clean.startswith("vision."):
            scale *= layer_decay ** (n_vis + 1 - vision_depth(clean, n_vis))
        wd = 0.0 if (p.ndim < 2 or "norm" in clean) else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr": lr * scale, "lr_scale": scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to base * min_ratio."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def recipe_optimizer(model: nn.Module, recipe: Recipe, parts: dict[str, bool]) -> torch.optim.AdamW | None:
    """The recipe's AdamW over the trainable `parts` (sets requires_grad; see param_groups), or None when
    nothing trains. Call it again after FSDP sharding: the groups must hold the sharded parameters."""
    o = recipe.optim
    groups = param_groups(model, parts, o.lr, o.weight_decay, o.layer_decay, o.part_lr)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay) if groups else None
