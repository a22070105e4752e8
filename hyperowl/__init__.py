"""hyperowl: run, serve, fine-tune and evaluate mPLUG-Owl models in plain PyTorch.

    model = hyperowl.load("mPLUG/mPLUG-Owl3-7B-241101", dtype="bfloat16", device="cuda")  # or a local dir
    model.chat([{"role": "user", "content": "<|image|>What is this?"}], images=["cat.jpg"])
"""

from __future__ import annotations

import logging
import os

from .config import PRESETS, Owl3Config, SiglipConfig
from .errors import CheckpointError, HyperowlError, InputError

__version__ = "0.1.0"
__all__ = ["load", "Owl3Config", "SiglipConfig", "PRESETS", "HyperowlError", "InputError", "CheckpointError"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def default_model_dir():
    """The embedded default model: $HYPEROWL_DEFAULT_MODEL, else the package data hyperowl/assets/owl3-synthetic
    (shipped in the wheel, so an installed hyperowl has it too)."""
    from pathlib import Path

    env = os.environ.get("HYPEROWL_DEFAULT_MODEL")
    return Path(env) if env else Path(__file__).resolve().parent / "assets" / "owl3-synthetic"


def load(model: str | os.PathLike | None = None, dtype=None, device=None, revision: str | None = None,
         quantize: str | None = None, compile_vision: bool = False):
    """Load an mPLUG-Owl3 (`Owl3Model`) or mPLUG-Owl2 (`Owl2Model`) checkpoint (local directory or hub id);
    config.json's model_type (mplugowl3 / mplug_owl2) decides.

    model: None = the embedded default model (a small Owl3 trained by this project, shipped in models/).
    dtype: None = float32 on CPU, the checkpoint's dtype on GPU. device: None = cuda if available.
    quantize: None, or "int8" for int8 weight-only LLM linears (inference only; see hyperowl.quantize).
    compile_vision: torch.compile the vision tower in place (parameter names unchanged). Each new chunk shape
    compiles once (~20 s on CPU). Measured on 2 CPU cores: 1.34x on the tower alone in steady state, but no
    TTFT gain in bench/bench_vs_llava.py --compile; measure on your hardware before relying on it.
    The returned model has the official drop-in forward and `.chat()` (when the checkpoint has a tokenizer).
    """
    import torch

    from .checkpoint import load_any
    from .processing.processor import Owl3Processor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = default_model_dir()
        if not (model / "config.json").exists():
            raise CheckpointError(f"the embedded default model is not at {model}; pass a model directory or hub id")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: the supported option is 'int8' (or None)")
    m = load_any(model, dtype=dtype, device=device, revision=revision)  # dispatches on config.json model_type
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(m)
    if compile_vision:
        m.vision.compile()
    if (m.checkpoint_dir / "tokenizer.json").exists() and m.config.__class__.__name__ == "Owl2Config":
        from .processing.owl2 import Owl2Processor  # mPLUG-Owl2: USER/ASSISTANT prompt, CLIP pixels

        m.processor = Owl2Processor.from_dir(m.checkpoint_dir, image_size=m.config.vision.image_size,
                                             image_aspect_ratio=m.config.image_aspect_ratio,
                                             eos_token_id=m.config.eos_token_id)
    elif (m.checkpoint_dir / "tokenizer.json").exists():
        m.processor = Owl3Processor.from_dir(m.checkpoint_dir, variant=m.config.variant, image_size=m.config.vision.image_size,
                                                cut=m.config.cut_enable)
    return m
