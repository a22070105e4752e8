"""Checkpoint key maps, as data: official tensor names -> ours (and back), per family and per source.

Design note: a key map is a list of (regex over the official name, replacement giving our name), first
match wins, plus a list of official names we knowingly ignore. `map_keys` is the one strict mapper: it
fails on any key it cannot place. The family table (families.py) says which map each family uses; the
loader (checkpoint.py) applies it. Nothing here touches tensors or files.
"""

from __future__ import annotations

import re
from typing import Iterable

from .config import Owl3Config
from .errors import CheckpointError

KeyMap = list[tuple[str, str]]

# Official mPLUG-Owl3 names -> ours. First match wins.
OWL3_KEYS: KeyMap = [
    (r"language_model\.model\.embed_tokens\.weight", r"decoder.embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", r"decoder.norm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.gate_proj\.0\.(weight|bias)", r"decoder.layers.\1.self_attn.gate_proj.\2"),
    (r"language_model\.model\.layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"language_model\.lm_head\.weight", r"lm_head.weight"),
    (r"vision_model\.embeddings\.(.+)", r"vision.embeddings.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.(.+)", r"vision.layers.\1.\2"),
    (r"vision2text_model\.0\.(weight|bias)", r"projector.fc1.\1"),
    (r"vision2text_model\.2\.(weight|bias)", r"projector.fc2.\1"),
    (r"vision2text_model\.(weight|bias)", r"projector.fc.\1"),
]
# Present in official checkpoints, unused by the Owl3 forward (it reads SigLIP hidden_states[-2]).
OWL3_IGNORED = [r"vision_model\.post_layernorm\..+", r"vision_model\.head\..+", r"vision_model\.encoder\.layers\.{last}\..+"]

# transformers' *ForCausalLM (a text-only LLM: Qwen2, LLaMA) -> our decoder. Owl2 checkpoints name their LLM
# the same way (its modality-adaptive `multiway.{0,1}` names are kept as they are).
CAUSAL_LM_KEYS: KeyMap = [
    (r"model\.embed_tokens\.weight", r"decoder.embed_tokens.weight"),
    (r"model\.norm\.weight", r"decoder.norm.weight"),
    (r"model\.layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
QWEN2_KEYS: KeyMap = CAUSAL_LM_KEYS
# transformers' LlamaForCausalLM -> the Owl2 decoder (upgrade): the LLM's norms and K/V become the *text* side.
LLAMA_TO_OWL2_KEYS: KeyMap = CAUSAL_LM_KEYS[:2] + [
    (r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)\.(weight|bias)", r"decoder.layers.\1.self_attn.\2.multiway.0.\3"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"decoder.layers.\1.\2.multiway.0.weight"),
] + CAUSAL_LM_KEYS[2:]
# transformers' SiglipVisionModel (with or without the `vision_model.` prefix) -> our vision tower.
SIGLIP_KEYS: KeyMap = [
    (r"(?:vision_model\.)?embeddings\.(.+)", r"vision.embeddings.\1"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)", r"vision.layers.\1.\2"),
]


OWL3_INVERSE: KeyMap = [
    (r"decoder\.layers\.(\d+)\.self_attn\.gate_proj\.(weight|bias)", r"language_model.model.layers.\1.self_attn.gate_proj.0.\2"),
    (r"decoder\.layers\.(\d+)\.(.+)", r"language_model.model.layers.\1.\2"),
    (r"decoder\.embed_tokens\.weight", r"language_model.model.embed_tokens.weight"),
    (r"decoder\.norm\.weight", r"language_model.model.norm.weight"),
    (r"lm_head\.weight", r"language_model.lm_head.weight"),
    (r"vision\.embeddings\.(.+)", r"vision_model.embeddings.\1"),
    (r"vision\.layers\.(\d+)\.(.+)", r"vision_model.encoder.layers.\1.\2"),
    (r"projector\.fc1\.(.+)", r"vision2text_model.0.\1"),
    (r"projector\.fc2\.(.+)", r"vision2text_model.2.\1"),
    (r"projector\.fc\.(.+)", r"vision2text_model.\1"),
]

OWL2_KEYS: KeyMap = CAUSAL_LM_KEYS + [
    (r"model\.vision_model\.embeddings\.(.+)", r"vision.embeddings.\1"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)", r"vision.layers.\1.\2"),
    (r"model\.vision_model\.post_layernorm\.(weight|bias)", r"vision.post_layernorm.\1"),
    (r"model\.visual_abstractor\.encoder\.layers\.(\d+)\.(.+)", r"abstractor.layers.\1.\2"),
    (r"model\.visual_abstractor\.(query_embeds|vit_eos)", r"abstractor.\1"),
    (r"model\.visual_abstractor\.visual_fc\.(weight|bias)", r"abstractor.visual_fc.\1"),
]
# Deterministic buffers some checkpoints carry: we recompute them (released checkpoints lack the sin-cos ones).
OWL2_IGNORED = [
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"model\.visual_abstractor\.encoder\.layers\.\d+\.crossattention\.attention\.(q|k)_pos_embed",
]
OWL2_INVERSE: KeyMap = [
    (r"decoder\.embed_tokens\.weight", r"model.embed_tokens.weight"),
    (r"decoder\.norm\.weight", r"model.norm.weight"),
    (r"decoder\.layers\.(\d+)\.(.+)", r"model.layers.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r"vision\.embeddings\.(.+)", r"model.vision_model.embeddings.\1"),
    (r"vision\.layers\.(\d+)\.(.+)", r"model.vision_model.encoder.layers.\1.\2"),
    (r"vision\.post_layernorm\.(.+)", r"model.vision_model.post_layernorm.\1"),
    (r"abstractor\.layers\.(\d+)\.(.+)", r"model.visual_abstractor.encoder.layers.\1.\2"),
    (r"abstractor\.(.+)", r"model.visual_abstractor.\1"),
]


def owl3_ignored(cfg: Owl3Config, tied: bool) -> list[str]:
    pats = [p.replace("{last}", str(cfg.vision.num_layers - 1)) for p in OWL3_IGNORED]
    if tied:  # a tied checkpoint may still carry a copy of the embedding as lm_head
        pats += [r"(language_model\.)?lm_head\.weight"]
    return pats


def owl2_ignored(cfg, tied: bool) -> list[str]:
    return OWL2_IGNORED + ([r"lm_head\.weight"] if tied else [])


def map_keys(names: Iterable[str], key_map: KeyMap, ignored: list[str] = ()) -> dict[str, str]:
    """official name -> our name for every non-ignored key; raises on the first unknown key."""
    compiled = [(re.compile(p), r) for p, r in key_map]
    skip = [re.compile(p) for p in ignored]
    out, unknown = {}, []
    for name in names:
        if any(s.fullmatch(name) for s in skip):
            continue
        for pat, rep in compiled:
            if pat.fullmatch(name):
                out[name] = pat.sub(rep, name)
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"unknown checkpoint keys (not the expected layout): {', '.join(sorted(unknown)[:5])}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return out


def detect_variant(names: Iterable[str]) -> str:
    names = set(names)
    if any(n.startswith("vision2text_model.0.") for n in names):
        return "241101"
    if "vision2text_model.weight" in names:
        return "240728"
    raise CheckpointError("cannot tell the mPLUG-Owl3 generation: no vision2text_model weights in the checkpoint")
