"""Make a new Owl3-style model from a text-only Qwen2 checkpoint + a SigLIP checkpoint + chosen hyper layers.

Design note: as in the papers, new modality modules start from the LM's own weights: each hyper layer's
`v_kv_proj` is that layer's k_proj / v_proj stacked in the (kv_head, {K, V}, head_dim) layout, so at
initialisation visual keys/values live in the same space as text keys/values. The 240728 gate starts
almost closed (weight 0, bias -4: g ~ 0.018) so the upgraded model first behaves like the text LLM; the
projection is random (std 0.02). Text-only inputs give exactly the source LLM's output.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (QWEN2_KEYS, SIGLIP_KEYS, load_weights, map_keys, read_config, resolve, safetensors_files,
                          shard_keys)
from ..config import Owl3Config, SiglipConfig
from ..errors import CheckpointError
from ..models.hyper_attention import HyperAttention
from ..models.owl3 import Owl3Model

log = logging.getLogger(__name__)

GATE_BIAS_INIT = -4.0


def upgrade(text_llm: str | os.PathLike, vision: str | os.PathLike, hyper_layers: list[int], variant: str = "240728",
            dtype: torch.dtype = torch.float32, seed: int = 0) -> Owl3Model:
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
    last = cfg.vision.num_layers - 1
    vmap = map_keys(vkeys, SIGLIP_KEYS, [r"(vision_model\.)?post_layernorm\..+", r"(vision_model\.)?head\..+", r"text_model\..+",
                                        r"logit_(scale|bias)", rf"(vision_model\.)?encoder\.layers\.{last}\..+"])

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
    model.source_dirs = (tdir, vdir)
    return model


def load_weights_partial(model: nn.Module, key_to_file, mapping, dtype) -> None:
    """load_weights without the 'every parameter filled' check (the caller checks once at the end)."""
    try:
        load_weights(model, key_to_file, mapping, dtype, "cpu")
    except CheckpointError as e:
        if "missing" not in str(e):
            raise


def with_media_tokens(src_dir: Path, dst: Path) -> Path:
    """The text LLM's tokenizer.json plus the Owl3 media tokens (<|image|>, ...) as special tokens."""
    from tokenizers import AddedToken, Tokenizer

    src = Path(src_dir) / "tokenizer.json"
    if not src.exists():
        raise CheckpointError(f"{src_dir}: no tokenizer.json; the upgraded model needs the text LLM's tokenizer")
    tok = Tokenizer.from_file(str(src))
    from ..processing.chat import END_CUT, END_VIDEO_FRAME, IMAGE_TOKEN, START_CUT, START_VIDEO_FRAME, VIDEO_TOKEN

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            (IMAGE_TOKEN, VIDEO_TOKEN, START_CUT, END_CUT, START_VIDEO_FRAME, END_VIDEO_FRAME)
                            if tok.token_to_id(t) is None])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst))
    return dst
