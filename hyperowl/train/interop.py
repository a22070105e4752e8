"""What other tools need from our training outputs: tokenizer/processor files, PEFT-format LoRA adapters.

Design note. A checkpoint's config.json and weights are the family's official layout already
(`hyperowl.checkpoint.save_checkpoint`, `config.to_hf_dict`: auto_map, model_type, architectures, the
fields the official config classes read). This module adds the files the official loaders open beside
them: `tokenizer_config.json` + `special_tokens_map.json` (so transformers' `AutoTokenizer` /
`PreTrainedTokenizerFast.from_pretrained(dir)` reads our `tokenizer.json` as a fast tokenizer with the
family's special tokens) and, for mPLUG-Owl2, whose
loader calls `CLIPImageProcessor.from_pretrained(dir)`, a `preprocessor_config.json` with the CLIP
resize / crop / mean / std our Owl2 processor implements. Limits: the official Owl2 builder asks for a slow
LLaMA tokenizer (`use_fast=False`, a SentencePiece `tokenizer.model`), which a BPE `tokenizer.json`
trained here cannot be; the official Owl3 code (its `auto_map` modules) is not ours to ship and must be
copied next to the weights from a released checkpoint for `trust_remote_code` loading.

`export_peft` writes a training checkpoint's LoRA adapters as PEFT does (`adapter_config.json` +
`adapter_model.safetensors`), under the official module names, so `peft.PeftModel.from_pretrained` puts
them on a model with the official module tree (e.g. the transformers Qwen2 / LLaMA of the LLM).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..checkpoint import read_config, safetensors_files, shard_keys
from ..errors import InputError
from ..families import family_for_checkpoint, family_of
from ..keymaps import map_keys

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
# The special tokens the official tokenizers declare, per family (model_type); missing ones are left out.
_SPECIAL = {
    "mplugowl3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "additional": ["<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>", "<|start_cut|>", "<|end_cut|>",
                                 "<|start_video_frame|>", "<|end_video_frame|>"]},
    "mplug_owl2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                   "additional": ["<|image|>", "<|video|>"]},
}


def write_tokenizer_files(model, tok_file: Path, d: Path) -> None:
    """`d/tokenizer.json` (copied) plus the files the official loaders read beside it (module note); `model`:
    the model or its config."""
    from tokenizers import Tokenizer

    d = Path(d)
    if Path(tok_file).resolve() != (d / "tokenizer.json").resolve():
        shutil.copy(tok_file, d / "tokenizer.json")
    family = family_of(model)
    spec = _SPECIAL.get(family.model_type, {})
    vocab = Tokenizer.from_file(str(tok_file)).get_vocab(with_added_tokens=True)
    special = {k: v for k, v in spec.items() if k != "additional" and v in vocab}
    extra = [t for t in spec.get("additional", []) if t in vocab]
    cfg = getattr(model, "config", model)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "additional_special_tokens": extra,
        "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False,
        "add_bos_token": "bos_token" in special}, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps({**special, "additional_special_tokens": extra}, indent=2))
    if family.model_type == "mplug_owl2":
        from ..processing.owl2 import CLIP_MEAN, CLIP_STD

        size = cfg.vision.image_size
        (d / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_convert_rgb": True}, indent=2))


# -- PEFT export ----------------------------------------------------------------------------------------------
_ADAPTER_KEY = re.compile(r"(.+)\.(lora_[AB])\.default\.weight")


def export_peft(checkpoint: str | Path, out: str | Path) -> Path:
    """A training checkpoint's LoRA adapters (trainer_state/adapters.safetensors) as a PEFT adapter directory:
    adapter_config.json (r, alpha, dropout, the adapted modules under their official names) and
    adapter_model.safetensors (`base_model.model.<official module>.lora_{A,B}.weight`)."""
    from peft import LoraConfig

    ckpt = Path(checkpoint)
    adapters_file = ckpt / "trainer_state" / "adapters.safetensors"
    if not adapters_file.is_file():
        what = "a run's output directory: pass one of its checkpoint-STEP directories" if any(ckpt.glob("checkpoint-*")) \
            else "not a LoRA training checkpoint (no trainer_state/adapters.safetensors; was the recipe's lora.r > 0?)"
        raise InputError(f"export --peft '{checkpoint}': {what}")
    raw = read_config(ckpt)
    family = family_for_checkpoint(raw, shard_keys(safetensors_files(ckpt)), where=str(ckpt / "config.json"))
    lora = json.loads((ckpt / "trainer_state" / "state.json").read_text())["recipe"]["lora"]
    adapters = load_file(str(adapters_file))
    modules = sorted({m.group(1) for k in adapters if (m := _ADAPTER_KEY.fullmatch(k))})
    if not modules or len(modules) * 2 != len(adapters):
        raise InputError(f"export --peft '{checkpoint}': unexpected adapter names in {adapters_file}")
    # our module name -> official one, through the family's (regex, 1:1) key map of the module's weight
    ours_to_official = map_keys([f"{m}.weight" for m in modules], family.inverse_key_map)
    official = {m: ours_to_official[f"{m}.weight"].removesuffix(".weight") for m in modules}
    tensors = {}
    for k, v in adapters.items():
        mod, ab = _ADAPTER_KEY.fullmatch(k).groups()
        tensors[f"base_model.model.{official[mod]}.{ab}.weight"] = v.contiguous()
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    base = (raw.get("_name_or_path") or json.loads((ckpt / "trainer_state" / "state.json").read_text())["recipe"]
            ["init"].get("from"))
    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     target_modules=sorted(official.values()), base_model_name_or_path=base)
    cfg.save_pretrained(str(o))
    save_file(tensors, str(o / "adapter_model.safetensors"), metadata={"format": "pt"})
    log.info("exported %d LoRA adapters of %s to %s", len(modules), ckpt, o)
    return o
