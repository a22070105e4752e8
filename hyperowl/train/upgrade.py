"""Make a new Owl3-style model from a text-only Qwen2 checkpoint + a SigLIP checkpoint + chosen hyper layers.

Design note: as in the papers, new modality modules start from the LM's own weights: each hyper layer's
`v_kv_proj` is that layer's k_proj / v_proj stacked in the (kv_head, {K, V}, head_dim) layout, so at
initialisation visual keys/values live in the same space as text keys/values. The 240728 gate starts
almost closed (weight 0, bias -4: g ~ 0.018) so the upgraded model first behaves like the text LLM; the
projection is random (std 0.02). Text-only inputs give exactly the source LLM's output.

mPLUG-Owl2 follows the same rule (its paper initialises the modality-adaptive module from the LLM):
`init_visual_from_text` copies every decoder layer's text RMSNorms and K/V projections (`multiway.0`) into
the visual ones (`multiway.1`), so at the start visual rows are normalised and projected exactly like text.
The trainer applies it to every Owl2 model it builds from a preset (`init.preset: owl2-...`);
`upgrade_owl2` builds an Owl2 model whose LLM is a text-only LLaMA checkpoint and applies it too.

Both return `Upgraded(model, text_dir, vision_dir)`, the source directories with hub ids resolved: the
caller ships the text LLM's tokenizer.json plus the media tokens (`tokenizer.with_media_tokens` /
`with_image_token`) next to the weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..checkpoint import load_weights, read_config, resolve, safetensors_files, shard_keys
from ..keymaps import LLAMA_TO_OWL2_KEYS, QWEN2_KEYS, SIGLIP_KEYS, map_keys
from ..config import Owl2Config, Owl3Config, SiglipConfig
from ..errors import CheckpointError, InputError
from ..models.hyper_attention import HyperAttention
from ..models.owl3 import Owl3Model

log = logging.getLogger(__name__)

GATE_BIAS_INIT = -4.0


class Upgraded(NamedTuple):
    """An upgraded model and the checkpoint directories it was made from (hub ids resolved): the text LLM's
    (whose tokenizer.json the model keeps, plus the media tokens) and the vision tower's (None for Owl2)."""

    model: nn.Module
    text_dir: Path
    vision_dir: Path | None = None


def upgrade(text_llm: str | os.PathLike, vision: str | os.PathLike, hyper_layers: list[int], variant: str = "240728",
            dtype: torch.dtype = torch.float32, seed: int = 0) -> Upgraded:
    tdir, vdir = resolve(text_llm), resolve(vision)
    tcfg, vraw = read_config(tdir), read_config(vdir)
    if tcfg.get("model_type") not in ("qwen2",):
        raise CheckpointError(f"{tdir}: model_type {tcfg.get('model_type')!r}; a Qwen2 text LLM is needed")
    vcfg = vraw.get("vision_config", vraw)
    if vcfg.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(f"{vdir}: not a SigLIP vision checkpoint")
    cfg = Owl3Config.from_hf_dict({**tcfg, "hyper_layers": hyper_layers, "vision_config": vcfg}, variant=variant)
    with torch.device("meta"):
        model = Owl3Model(cfg)

    tkeys = shard_keys(safetensors_files(tdir))
    tmap = map_keys(tkeys, QWEN2_KEYS, [r".*rotary_emb\.inv_freq", *([r"lm_head\.weight"] if cfg.tie_word_embeddings else [])])
    vkeys = shard_keys(safetensors_files(vdir))
    vmap = siglip_key_map(vkeys, cfg.vision.num_layers)

    # New parameters first (everything load_weights does not fill), then the two checkpoints.
    g = torch.Generator().manual_seed(seed)
    new = {n: p for n, p in model.named_parameters()
           if n.startswith("projector.") or ".v_kv_proj." in n or (".self_attn.gate_proj." in n)}
    for n, p in new.items():
        init = torch.zeros(p.shape) if (n.endswith("bias") or "gate_proj" in n) else torch.randn(p.shape, generator=g) * 0.02
        if "gate_proj" in n and n.endswith("bias"):
            init.fill_(GATE_BIAS_INIT)
        model.get_submodule(n.rpartition(".")[0])._parameters[n.rpartition(".")[2]] = nn.Parameter(init.to(dtype))
    with torch.device("cpu"):
        load_weights_partial(model, tkeys, tmap, dtype)
        load_weights_partial(model, vkeys, vmap, dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"upgrade: tensors missing from the source checkpoints, e.g. {', '.join(missing[:4])}")
    with torch.no_grad():
        for layer in model.decoder.layers:
            a = layer.self_attn
            if isinstance(a, HyperAttention):
                kvh, d = a.kv_heads, a.head_dim
                w = torch.stack([a.k_proj.weight.view(kvh, d, -1), a.v_proj.weight.view(kvh, d, -1)], 1)  # [kvh, 2, D, H]
                b = torch.stack([a.k_proj.bias.view(kvh, d), a.v_proj.bias.view(kvh, d)], 1)
                a.v_kv_proj.weight.copy_(w.reshape(2 * kvh * d, -1))
                a.v_kv_proj.bias.copy_(b.reshape(-1))
    return Upgraded(model, tdir, vdir)


def siglip_key_map(keys, num_layers: int) -> dict[str, str]:
    """SigLIP (vision or full) checkpoint key -> our `vision.*` name. Owl3 reads the penultimate layer, so the
    last layer, the post-LayerNorm, the pooling head and a full SigLIP's text side are not used."""
    return map_keys(keys, SIGLIP_KEYS, [r"(vision_model\.)?post_layernorm\..+", r"(vision_model\.)?head\..+", r"text_model\..+",
                                        r"logit_(scale|bias)", rf"(vision_model\.)?encoder\.layers\.{num_layers - 1}\..+"])


def load_vision_tower(model: Owl3Model, vision: str | os.PathLike) -> Path:
    """Put a pretrained SigLIP tower (a checkpoint dir / hub id, e.g. `hyperowl pretrain-vision`'s output) into
    an Owl3 model built from a preset; its vision_config must have the model's tower shape. Returns the dir."""
    vdir = resolve(vision)
    raw = read_config(vdir)
    vcfg = raw.get("vision_config", raw)
    if vcfg.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(f"init.vision '{vdir}': not a SigLIP vision checkpoint (model_type {vcfg.get('model_type')!r})")
    theirs, ours = SiglipConfig.from_hf_dict(vcfg), model.config.vision
    diff = {f: (getattr(theirs, f), getattr(ours, f)) for f in ("hidden_size", "intermediate_size", "num_layers",
                                                                 "num_heads", "image_size", "patch_size")
            if getattr(theirs, f) != getattr(ours, f)}
    if diff:
        raise CheckpointError(f"init.vision '{vdir}': its tower differs from the preset's ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())});"
                              " pretrain a tower of the preset's shape or pick a preset with this vision_config")
    keys = shard_keys(safetensors_files(vdir))
    mapping = siglip_key_map(keys, ours.num_layers)
    missing = sorted({n for n, _ in model.named_parameters() if n.startswith("vision.")} - set(mapping.values()))
    if missing:
        raise CheckpointError(f"init.vision '{vdir}': missing {len(missing)} tower tensor(s), e.g. {', '.join(missing[:3])}")
    device, dtype = model.vision.embeddings.patch_embedding.weight.device, model.vision.embeddings.patch_embedding.weight.dtype
    load_weights(model, keys, mapping, dtype, device)
    log.info("vision tower from %s", vdir)
    return vdir


def init_visual_from_text(model: nn.Module) -> int:
    """Owl2: copy each layer's text LayerNorm (RMSNorm) / K / V weights (and biases) into the visual ones.
    Returns the number of tensors copied."""
    from ..models.modality_adaptive import MultiwayLinear, MultiwayRMSNorm

    copied = 0
    with torch.no_grad():
        for layer in model.decoder.layers:
            for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if not isinstance(m, (MultiwayLinear, MultiwayRMSNorm)):
                    raise TypeError(f"init_visual_from_text: {type(m).__name__} is not a modality-adaptive module")
                text, visual = m.multiway[0], m.multiway[1]
                for name, p in visual.named_parameters():
                    p.copy_(text.get_parameter(name))
                    copied += 1
    return copied


def upgrade_owl2(text_llm: str | os.PathLike, visual: Owl2Config, dtype: torch.dtype = torch.float32, seed: int = 0
                 ) -> Upgraded:
    """An mPLUG-Owl2 model whose LLM is a text-only LLaMA checkpoint (transformers layout, safetensors).

    The ViT and abstractor take their shapes from `visual` (e.g. an `OWL2_PRESETS` entry) and start random
    (N(0, 0.02) matrices, unit norms, zero biases); the modality-adaptive visual side is copied from the
    LLM's own norms/K/V (`init_visual_from_text`). Text-only inputs give exactly the LLaMA's output.
    """
    from ..models.abstractor import AbstractorAttention
    from ..models.owl2 import Owl2Model

    tdir = resolve(text_llm)
    tcfg = read_config(tdir)
    if tcfg.get("model_type") != "llama":
        raise CheckpointError(f"{tdir}: model_type {tcfg.get('model_type')!r}; a LLaMA text LLM is needed")
    vis = visual.to_hf_dict()
    try:
        cfg = Owl2Config.from_hf_dict({**tcfg, "visual_config": vis["visual_config"], "image_aspect_ratio": visual.image_aspect_ratio,
                                       "vision_batch_size": visual.vision_batch_size})
    except (KeyError, ValueError) as e:
        raise InputError(f"{tdir / 'config.json'}: cannot build an mPLUG-Owl2 config from it ({e})") from None
    with torch.device("meta"):
        model = Owl2Model(cfg)
    keys = shard_keys(safetensors_files(tdir))
    mapping = map_keys(keys, LLAMA_TO_OWL2_KEYS, [r".*rotary_emb\.inv_freq", *([r"lm_head\.weight"] if cfg.tie_word_embeddings else [])])
    with torch.device("cpu"):
        load_weights_partial(model, keys, mapping, dtype)
    g = torch.Generator().manual_seed(seed)
    for n, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if ".multiway.1." in n:  # filled from the text side below
            init = torch.zeros(p.shape)
        elif n.endswith("bias"):
            init = torch.zeros(p.shape)
        elif ("norm" in n or ".ffn_ln." in n) and n.endswith("weight"):
            init = torch.ones(p.shape)
        else:
            init = torch.randn(p.shape, generator=g) * 0.02
        mod_name, _, leaf = n.rpartition(".")
        model.get_submodule(mod_name)._parameters[leaf] = nn.Parameter(init.to(dtype))
    placed = set(mapping.values())  # the LLM (text side) must come entirely from the checkpoint
    text_side = {n for n, _ in model.named_parameters() if n.startswith(("decoder.", "lm_head.")) and ".multiway.1." not in n}
    absent = sorted(text_side - placed)
    if absent:
        raise CheckpointError(f"upgrade_owl2: {tdir} lacks LLM tensors, e.g. {', '.join(absent[:4])}")
    for m in model.modules():
        if isinstance(m, AbstractorAttention):
            m.init_tables("cpu")
    init_visual_from_text(model)
    return Upgraded(model, tdir)


def load_weights_partial(model: nn.Module, key_to_file, mapping, dtype) -> None:
    """load_weights without the 'every parameter filled' check (the caller checks once at the end)."""
    try:
        load_weights(model, key_to_file, mapping, dtype, "cpu")
    except CheckpointError as e:
        if "missing" not in str(e):
            raise
