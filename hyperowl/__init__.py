"""hyperowl: run, serve, fine-tune and evaluate mPLUG-Owl models in plain PyTorch.

    owl = hyperowl.load("mPLUG/mPLUG-Owl3-7B-241101", dtype="bfloat16", device="cuda")  # or a local dir
    owl.chat([{"role": "user", "content": "<|image|>What is this?"}], images=["cat.jpg"])
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .config import PRESETS, Owl3Config, SiglipConfig
from .errors import CheckpointError, HyperowlError, InputError

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Owl3Config", "SiglipConfig", "PRESETS", "HyperowlError", "InputError", "CheckpointError"]

if TYPE_CHECKING:
    from .pipeline import Pipeline

logging.getLogger(__name__).addHandler(logging.NullHandler())


def default_model_dir():
    """The embedded default model: $HYPEROWL_DEFAULT_MODEL, else the package data hyperowl/assets/owl3-synthetic
    (shipped in the wheel, so an installed hyperowl has it too)."""
    from pathlib import Path

    env = os.environ.get("HYPEROWL_DEFAULT_MODEL")
    return Path(env) if env else Path(__file__).resolve().parent / "assets" / "owl3-synthetic"


def load(model: str | os.PathLike | None = None, dtype=None, device=None, revision: str | None = None,
         quantize: str | None = None, compile_vision: bool = False, feature_cache_mb: float = 256.0) -> "Pipeline":
    """Load an mPLUG-Owl3 (either generation) or mPLUG-Owl2 checkpoint (local directory or hub id) as a
    `Pipeline`: the model (`.model`, an `Owl3Model` / `Owl2Model` with the official drop-in forward), its
    processor (when the checkpoint has a tokenizer.json) and the encoder with its feature cache.

    model: None = the embedded default model (a small Owl3 trained by this project, shipped in the package).
    dtype: None = float32 on CPU, the checkpoint's dtype on GPU. device: None = cuda if available.
    quantize: None, or "int8" for int8 weight-only LLM linears (inference only; see hyperowl.quantize).
    compile_vision: torch.compile the vision tower in place (parameter names unchanged). Each new chunk shape
    compiles once (~20 s on CPU). Measured on 2 CPU cores: 1.34x on the tower alone in steady state, but no
    TTFT gain in bench/bench_vs_llava.py --compile; measure on your hardware before relying on it.
    feature_cache_mb: memory for image/video features kept by content hash (0 = off), so the images of a
    multi-turn chat are encoded once.
    """
    import torch

    from .checkpoint import load_checkpoint
    from .pipeline import Pipeline
    from .processing.processor import load_tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = default_model_dir()
        if not (model / "config.json").exists():
            raise CheckpointError(f"the embedded default model is not at {model}; pass a model directory or hub id")
    if quantize not in (None, "int8"):
        raise InputError(f"quantize={quantize!r}: the supported option is 'int8' (or None)")
    m, family, d = load_checkpoint(model, dtype=dtype, device=device, revision=revision)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(m)
    if compile_vision:
        m.vision.compile()
    processor = family.processor(load_tokenizer(d), m.config) if (d / "tokenizer.json").exists() else None
    return Pipeline(m, processor, family=family, checkpoint_dir=d, feature_cache_mb=feature_cache_mb)


def __getattr__(name: str):
    if name == "Pipeline":  # lazy: importing hyperowl stays cheap (no torch until used)
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'hyperowl' has no attribute {name!r}")
