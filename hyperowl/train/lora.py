"""LoRA through PEFT on the LLM (and optionally the vision tower), with merge-and-save.

Design note: adapters are injected into our plain modules with `peft.inject_adapter_in_model`, matched by
module-name suffix (q_proj, ..., down_proj). The adapted base weights are frozen; adapters always train.
`merge_lora` folds every adapter into its base Linear and puts the plain Linear back, so the merged model
has exactly the official parameter names again and saves/loads like any checkpoint.
"""

from __future__ import annotations

import re

from torch import nn

from .recipe import LoraSpec


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Inject adapters; returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    scope = r"(decoder|vision)" if spec.vision else r"decoder"
    # Owl2's modality-adaptive K/V are two Linears (`k_proj.multiway.0` text, `.multiway.1` visual): both adapted
    pattern = rf"{scope}\..*\.({'|'.join(map(re.escape, spec.targets))})(\.multiway\.[01])?"
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    inject_adapter_in_model(cfg, model)
    for n in names:
        for p in model.get_submodule(n).base_layer.parameters():
            p._frozen_base = True  # read by optim.param_groups
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold adapters into the base weights and restore plain Linears. Returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, leaf = name.rpartition(".")
            base = module.get_base_layer()
            for p in base.parameters():
                if hasattr(p, "_frozen_base"):
                    del p._frozen_base
            setattr(model.get_submodule(parent_name), leaf, base)
            merged += 1
    return merged
