from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(os.environ.get("HYPEROWL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OWL3_FIXTURE = SHARED / "fixtures" / "owl3-240728-tiny"


@pytest.fixture(scope="session")
def owl3_fixture_dir() -> Path:
    if not (OWL3_FIXTURE / "model.safetensors").exists():
        pytest.fail(f"fixture not found at {OWL3_FIXTURE}; set HYPEROWL_SHARED to the shared/ folder")
    return OWL3_FIXTURE


@pytest.fixture(scope="session")
def owl3_ref(owl3_fixture_dir):
    from safetensors.torch import load_file

    return load_file(str(owl3_fixture_dir / "reference_outputs.safetensors"))


@pytest.fixture(scope="session")
def owl3_tiny(owl3_fixture_dir):
    from hyperowl.checkpoint import load_owl3

    return load_owl3(owl3_fixture_dir)


def random_owl3(variant: str = "240728", seed: int = 0, **overrides):
    """A tiny Owl3 model with random weights (std 0.08 like the fixture, so attention is not uniform)."""
    from hyperowl.config import PRESETS
    from hyperowl.models.owl3 import Owl3Model

    torch.manual_seed(seed)
    cfg = PRESETS[f"tiny-{variant}"].replace(**overrides)
    model = Owl3Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>",
                  "<|start_cut|>", "<|end_cut|>", "<|start_video_frame|>", "<|end_video_frame|>"]


def make_tokenizer(vocab_size: int = 1000):
    """A real byte-level BPE tokenizer trained here, with the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What colour is the circle? The circle is red.", "Compare the two pictures.", "Describe this video.",
              "A blue square is left of a green triangle.", "system user assistant", "Cut to rows columns global view subimg"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, owl3_fixture_dir):
    """The fixture checkpoint plus a tokenizer.json: a complete (tiny) model directory."""
    import shutil

    d = tmp_path_factory.mktemp("owl3-chat")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(owl3_fixture_dir / name, d / name)
    make_tokenizer().save(str(d / "tokenizer.json"))
    return d
