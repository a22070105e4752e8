"""Checkpoints: official key maps as data, one strict safetensors loader, hub download, saving.

Design note: a key map is a list of (regex over the official name, replacement giving our name) plus a
list of official names we knowingly ignore. `map_keys` applies it and fails on any key it cannot place,
and on any parameter of ours that no key fills. Loading builds the model on the meta device and then
streams each shard tensor straight into the target dtype/device, so peak memory is about one model,
not two. Pickle files (`.bin`, `.pt`) are never opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import Owl3Config
from .errors import CheckpointError

log = logging.getLogger(__name__)

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

# transformers' Qwen2ForCausalLM (text-only LLM) -> our decoder.
QWEN2_KEYS: KeyMap = [
    (r"model\.embed_tokens\.weight", r"decoder.embed_tokens.weight"),
    (r"model\.norm\.weight", r"decoder.norm.weight"),
    (r"model\.layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
# transformers' SiglipVisionModel (with or without the `vision_model.` prefix) -> our vision tower.
SIGLIP_KEYS: KeyMap = [
    (r"(?:vision_model\.)?embeddings\.(.+)", r"vision.embeddings.\1"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)", r"vision.layers.\1.\2"),
]


def _ignored_patterns(cfg: Owl3Config, tied: bool) -> list[str]:
    pats = [p.replace("{last}", str(cfg.vision.num_layers - 1)) for p in OWL3_IGNORED]
    if tied:  # a tied checkpoint may still carry a copy of the embedding as lm_head
        pats += [r"(language_model\.)?lm_head\.weight"]
    return pats


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


# -- locating files ------------------------------------------------------------------------------------------
def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a hub id downloaded (safetensors and small files only) via huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model '{path_or_id}' is a file: pass the checkpoint directory (with config.json)")
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"model '{s}': no such directory, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"]))
    except Exception as e:  # network, auth, missing repo: all user-facing
        raise CheckpointError(
            f"model '{s}': cannot download it from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            "Check the id and your network, or download it elsewhere and pass the local directory"
        ) from e


def safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({d / f for f in weight_map.values()})
    elif (d / "model.safetensors").exists():  # the single-file layout; other *.safetensors may sit beside it
        files = [d / "model.safetensors"]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(f"{d} has only pickle weights ({', '.join(pickles[:3])}); hyperowl never loads pickle. "
                                  "Convert them once with `hyperowl convert SRC OUT --trust-pickle` (only if you trust them), then retry")
        raise CheckpointError(f"{d}: no *.safetensors weights found")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{d}: shard(s) named in the index are missing: {', '.join(missing[:3])}")
    return files


def read_config(d: Path) -> dict:
    f = d / "config.json"
    if not f.exists():
        raise CheckpointError(f"{d}: no config.json; pass a checkpoint directory (config.json + *.safetensors)")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e


def shard_keys(files: list[Path]) -> dict[str, Path]:
    out = {}
    for f in files:
        try:
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return out


# -- loading ------------------------------------------------------------------------------------------------
def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters.get(leaf)
    if old is None:
        raise CheckpointError(f"checkpoint tensor maps to '{name}', which this model does not have")
    if tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"'{name}': checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)} (config.json mismatch?)")
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: Path, keys: Iterable[str]):
    """Yield (key, tensor) for `keys`, each read from the file into its own fresh CPU buffer.

    Plain reads instead of a memory map: the returned tensors own their memory, so a loaded model never
    depends on (or breaks when someone overwrites) the checkpoint file, and peak memory is the model plus
    one tensor. The format is the safetensors one: u64 header length, JSON header, raw little-endian data.
    """
    with open(path, "rb") as fh:
        try:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        except (ValueError, MemoryError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        base = 8 + n
        for k in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # sequential reads
            meta = header[k]
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{k}' has unsupported dtype {meta['dtype']}")
            start, end = meta["data_offsets"]
            buf = bytearray(end - start)
            fh.seek(base + start)
            if fh.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: truncated file (tensor '{k}' is incomplete); re-download it")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield k, t.view(meta["shape"])


def load_weights(model: nn.Module, key_to_file: dict[str, Path], mapping: dict[str, str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
    """Stream tensors shard by shard into `model` (built on meta); every parameter must be filled."""
    params = dict(model.named_parameters())
    unknown = sorted(k for k, ours in mapping.items() if ours not in params)
    if unknown:
        raise CheckpointError(f"unknown checkpoint keys (no such parameter in this model): {', '.join(unknown[:5])}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    by_file: dict[Path, list[str]] = {}
    for k in mapping:
        by_file.setdefault(key_to_file[k], []).append(k)
    for f, keys in by_file.items():
        for k, t in read_safetensors(f, keys):
            _set_param(model, mapping[k], t.to(device=device, dtype=dtype))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:4])}")


def default_dtype(device: torch.device | str, config_dtype: str | None) -> torch.dtype:
    """float32 on CPU (bf16 GEMMs are ~8x slower there); the checkpoint's dtype (else bf16) on accelerators."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return getattr(torch, config_dtype or "bfloat16", torch.bfloat16)


def load_owl3(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
              device: torch.device | str = "cpu", revision: str | None = None):
    from .models.owl3 import Owl3Model

    d = resolve(path_or_id, revision)
    raw = read_config(d)
    if raw.get("model_type") != "mplugowl3":
        raise CheckpointError(f"{d / 'config.json'}: model_type is {raw.get('model_type')!r}, expected 'mplugowl3'")
    key_to_file = shard_keys(safetensors_files(d))
    cfg = Owl3Config.from_hf_dict(raw, variant=detect_variant(key_to_file))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device, raw.get("torch_dtype"))
    mapping = map_keys(key_to_file, OWL3_KEYS, _ignored_patterns(cfg, cfg.tie_word_embeddings))
    with torch.device("meta"):
        model = Owl3Model(cfg)
    load_weights(model, key_to_file, mapping, dtype, device)
    model.checkpoint_dir = d
    log.info("loaded %s (mPLUG-Owl3 %s, %s, %s)", d, cfg.variant, dtype, device)
    return model.eval()


# -- saving (official layout) -------------------------------------------------------------------------------
def official_state_dict(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameters (a model, or a name -> tensor dict) under the official names (the inverse of OWL3_KEYS)."""
    inverse = [
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
    names = dict(model) if isinstance(model, dict) else dict(model.named_parameters())
    mapping = map_keys(names, inverse)
    return {mapping[n]: p.detach().contiguous() for n, p in names.items()}


def _refuse_quantized(model: nn.Module) -> None:
    if getattr(model, "quantized", None):
        raise CheckpointError("this model was quantized for inference (int8); save the unquantized model instead")


def save_owl3(model: nn.Module, out_dir: str | os.PathLike, params: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors in the official layout. `params` overrides the model's own tensors
    (e.g. a gathered full state dict of a sharded model)."""
    _refuse_quantized(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    save_file(official_state_dict(params if params is not None else model), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ==========================================================================================================
# mPLUG-Owl2 (model_type `mplug_owl2`): same mechanism (key map as data, strict map_keys, streaming loader).
# ==========================================================================================================
OWL2_KEYS: KeyMap = [
    (r"model\.embed_tokens\.weight", r"decoder.embed_tokens.weight"),
    (r"model\.norm\.weight", r"decoder.norm.weight"),
    (r"model\.layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),  # multiway.{0,1} names are kept as they are
    (r"lm_head\.weight", r"lm_head.weight"),
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
_OWL2_INVERSE: KeyMap = [
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


def load_owl2(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
              device: torch.device | str = "cpu", revision: str | None = None):
    from .config import Owl2Config
    from .models.abstractor import AbstractorAttention
    from .models.owl2 import Owl2Model

    d = resolve(path_or_id, revision)
    raw = read_config(d)
    if raw.get("model_type") != "mplug_owl2":
        raise CheckpointError(f"{d / 'config.json'}: model_type is {raw.get('model_type')!r}, expected 'mplug_owl2'")
    key_to_file = shard_keys(safetensors_files(d))
    try:
        cfg = Owl2Config.from_hf_dict(raw)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not a valid mPLUG-Owl2 config ({type(e).__name__}: {e})") from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device, raw.get("torch_dtype"))
    ignored = OWL2_IGNORED + ([r"lm_head\.weight"] if cfg.tie_word_embeddings else [])
    mapping = map_keys(key_to_file, OWL2_KEYS, ignored)
    with torch.device("meta"):
        model = Owl2Model(cfg)
    load_weights(model, key_to_file, mapping, dtype, device)
    for m in model.modules():  # non-persistent sin-cos tables: computed, never read from the checkpoint
        if isinstance(m, AbstractorAttention):
            m.init_tables(device)
    model.checkpoint_dir = d
    log.info("loaded %s (mPLUG-Owl2, %s, %s)", d, dtype, device)
    return model.eval()


def save_owl2(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """config.json + model.safetensors in the official mPLUG-Owl2 layout (loadable by load_owl2)."""
    _refuse_quantized(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    names = dict(model.named_parameters())
    mapping = map_keys(names, _OWL2_INVERSE)
    save_file({mapping[n]: p.detach().contiguous() for n, p in names.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def load_any(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
             device: torch.device | str = "cpu", revision: str | None = None):
    """Dispatch on config.json's model_type: mplugowl3 -> load_owl3, mplug_owl2 -> load_owl2."""
    d = resolve(path_or_id, revision)
    model_type = read_config(d).get("model_type")
    loaders = {"mplugowl3": load_owl3, "mplug_owl2": load_owl2}
    if model_type not in loaders:
        raise CheckpointError(f"{d / 'config.json'}: model_type {model_type!r} is not supported "
                              f"(expected one of {', '.join(loaders)})")
    return loaders[model_type](d, dtype=dtype, device=device)


# -- one-shot conversion of pickle checkpoints (explicitly trusted by the user) --------------------------------
def convert_pickle_checkpoint(src: str | os.PathLike, out: str | os.PathLike, trust_pickle: bool = False) -> Path:
    """Rewrite a checkpoint whose weights are pickle files (`*.bin`, `*.pt`) as safetensors, copying the other
    small files (config, tokenizer). Unpickling can run code, so this refuses unless `trust_pickle` is True;
    even then torch.load runs with weights_only=True."""
    import shutil

    if not trust_pickle:
        raise CheckpointError("converting pickle weights can execute code hidden in them; re-run with --trust-pickle "
                              "only if you trust the source of this checkpoint")
    s, o = Path(src).expanduser(), Path(out).expanduser()
    if not s.is_dir():
        raise CheckpointError(f"'{src}': no such checkpoint directory")
    pickles = sorted(p for p in s.iterdir() if p.suffix in (".bin", ".pt", ".pth") and p.is_file())
    if not pickles:
        raise CheckpointError(f"{s}: no pickle weight files (*.bin, *.pt, *.pth) to convert")
    if o.resolve() == s.resolve():
        raise CheckpointError("--out must be a different directory from the source")
    o.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, p in enumerate(pickles):
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{p}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{p}: not a state dict of tensors")
        name = "model.safetensors" if len(pickles) == 1 else f"model-{i + 1:05d}-of-{len(pickles):05d}.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(o / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        log.info("converted %s -> %s (%d tensors)", p.name, name, len(sd))
    if len(pickles) > 1:
        (o / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for f in s.iterdir():  # config, tokenizer, processor files; never the pickles or their index
        if f.is_file() and f.suffix not in (".bin", ".pt", ".pth", ".safetensors") and not f.name.endswith(".bin.index.json"):
            shutil.copy(f, o / f.name)
    return o
