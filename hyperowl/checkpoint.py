"""Checkpoints: one strict safetensors loader for every family, hub download, saving.

Design note: the family table (families.py) says, from config.json's model_type and the tensor names,
which config, model class and key map a checkpoint needs; the key maps themselves are data in
keymaps.py. `map_keys` fails on any key it cannot place, and `load_weights` on any parameter of ours
that no key fills. Loading builds the model on the meta device and then
streams each shard tensor straight into the target dtype/device, so peak memory is about one model,
not two. Pickle files (`.bin`, `.pt`) are never opened.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, InputError
# Key maps are data in keymaps.py; re-exported here for callers that import them with the loader.
from .keymaps import (LLAMA_TO_OWL2_KEYS, OWL2_IGNORED, OWL2_INVERSE, OWL2_KEYS, OWL3_IGNORED, OWL3_INVERSE, OWL3_KEYS,  # noqa: F401
                      QWEN2_KEYS, SIGLIP_KEYS, KeyMap, detect_variant, map_keys)

log = logging.getLogger(__name__)


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
        raw = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object {{...}} of settings, got a {type(raw).__name__}")
    return raw


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_HINT = "use cpu, cuda, cuda:N or mps"


def check_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, or InputError (one line) when it is not one this process can use: a typo,
    CUDA on a CPU-only build of torch or without a visible GPU, a GPU index past the last one."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device '{device}': not a device; {_DEVICE_HINT}") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise InputError(f"device '{device}': this PyTorch is a CPU-only build (no CUDA support); use cpu, or "
                             "install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}': no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES); "
                             "use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device '{device}': only {n} CUDA device(s) are visible (cuda:0 .. cuda:{n - 1})")
    elif dev.type in ("mps", "xpu"):
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise InputError(f"device '{device}': {dev.type} is not available in this PyTorch or on this machine; use cpu")
    elif dev.type != "cpu":
        raise InputError(f"device '{device}': {dev.type} devices are not supported; {_DEVICE_HINT}")
    return dev


def check_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """`dtype` (a name or a torch dtype; None = the default) as a torch dtype, or InputError (one line) when it
    is not a supported weight dtype or the device cannot compute in it (bfloat16 on a GPU without it)."""
    if dtype is None:
        return None
    dt = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if dt not in DTYPES.values():
        raise InputError(f"dtype '{dtype}': not supported; use {', '.join(DTYPES)}")
    if dt == torch.bfloat16 and device.type == "cuda":
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch without the argument
            ok = torch.cuda.is_bf16_supported()
        if not ok:
            raise InputError(f"dtype '{dtype}': {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                             "use float16 or float32")
    return dt


def load_checkpoint(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu", revision: str | None = None, expect: str | None = None):
    """Any supported checkpoint -> (model, family, directory). The family table decides everything that
    differs (config class, model class, key map); `expect` = a config.json model_type to insist on."""
    from .families import family_for_checkpoint

    device = check_device(device)  # before any download: a typo fails fast, in one line
    dtype = check_dtype(dtype, device)
    d = resolve(path_or_id, revision)
    raw = read_config(d)
    if expect is not None and raw.get("model_type") != expect:
        raise CheckpointError(f"{d / 'config.json'}: model_type is {raw.get('model_type')!r}, expected {expect!r}")
    key_to_file = shard_keys(safetensors_files(d))
    family = family_for_checkpoint(raw, key_to_file, where=str(d / "config.json"))
    cfg = family.config_from_hf(raw, where=str(d / "config.json"))
    dtype = dtype or default_dtype(device, raw.get("torch_dtype"))
    mapping = map_keys(key_to_file, family.key_map, family.ignored(cfg, cfg.tie_word_embeddings))
    try:
        with torch.device("meta"):
            model = family.model_cls(cfg)
    except (ValueError, KeyError) as e:  # a config value the schema lets through but the model refuses
        raise CheckpointError(f"{d / 'config.json'}: not a valid {family.description} config ({e})") from None
    load_weights(model, key_to_file, mapping, dtype, device)
    family.after_load(model, device)
    log.info("loaded %s (%s, %s, %s)", d, family.description, dtype, device)
    return model.eval(), family, d


def load_owl3(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
              device: torch.device | str = "cpu", revision: str | None = None):
    """An mPLUG-Owl3 checkpoint (either generation) -> Owl3Model."""
    return load_checkpoint(path_or_id, dtype, device, revision, expect="mplugowl3")[0]


def load_owl2(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
              device: torch.device | str = "cpu", revision: str | None = None):
    """An mPLUG-Owl2 checkpoint -> Owl2Model."""
    return load_checkpoint(path_or_id, dtype, device, revision, expect="mplug_owl2")[0]


def load_any(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
             device: torch.device | str = "cpu", revision: str | None = None):
    """Any supported checkpoint -> its model (config.json's model_type decides)."""
    return load_checkpoint(path_or_id, dtype, device, revision)[0]


# -- saving (official layout) -------------------------------------------------------------------------------
def official_state_dict(model: nn.Module | dict[str, torch.Tensor], key_map: KeyMap = OWL3_INVERSE
                        ) -> dict[str, torch.Tensor]:
    """Our parameters (a model, or a name -> tensor dict) under the official names (default: Owl3's)."""
    names = dict(model) if isinstance(model, dict) else dict(model.named_parameters())
    mapping = map_keys(names, key_map)
    return {mapping[n]: p.detach().contiguous() for n, p in names.items()}


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, params: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors in the model family's official layout (loadable by load_checkpoint and
    by the official code). `params` overrides the model's own tensors (merged LoRA weights, a gathered
    full state dict of a sharded model)."""
    from .families import family_of
    from .quantize import is_quantized

    if is_quantized(model):
        raise CheckpointError("this model was quantized for inference (int8); save the unquantized model instead")
    family = family_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = official_state_dict(params if params is not None else model, family.inverse_key_map)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    config = model.config.to_hf_dict()
    if len(dtypes) == 1:  # the official loaders read the weights' dtype from here
        config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


save_owl3 = save_owl2 = save_checkpoint  # the family is read from the model


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
