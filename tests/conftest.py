from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# An engine built without a K/V budget reserves 30 % of the available host memory for its block pool
# (paged_cache.default_kv_cache_bytes; torch.empty, so untouched pages cost nothing). Servers of module-scoped
# fixtures build such engines, and while a few are alive (freed only when the garbage collector gets to them) the
# suite's reservations pass the machine's memory: a later fork (DataLoader workers in test_train) then failed
# with ENOMEM. Tests cap the default at 1 GB; test_paged_engine checks the library's own default.
TEST_DEFAULT_KV_BYTES = 1 << 30


@pytest.fixture(autouse=True, scope="session")
def _bounded_default_kv_budget():
    from hyperowl import batching

    library_default = batching.default_kv_cache_bytes
    batching.default_kv_cache_bytes = lambda device, share=None: min(library_default(device, share),
                                                                     TEST_DEFAULT_KV_BYTES)
    yield
    batching.default_kv_cache_bytes = library_default


# The official-implementation fixtures (tiny checkpoints, reference outputs, processor outputs) live in the
# repository, next to this file; tests/fixtures/*/README.md says how each was made.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OWL3_FIXTURE = FIXTURES / "owl3-240728-tiny"
OWL2_FIXTURE = FIXTURES / "owl2-tiny"
FIXTURE_FILES = ("config.json", "model.safetensors", "reference_outputs.safetensors",
                 "processor/processor_outputs.json", "processor/processor_outputs.safetensors",
                 "processor/input_image_0.png", "processor/input_image_1.png")


def fixture_missing(d: Path) -> str | None:
    """Why the fixture directory d cannot be used (a skip reason), or None when every file the tests read is there."""
    if not d.is_dir():
        return f"fixture {d} not found"
    missing = [name for name in FIXTURE_FILES if not (d / name).is_file()]
    return f"fixture {d} is incomplete (missing {', '.join(missing)})" if missing else None


def require_fixture(d: Path) -> Path:
    """d, or skip the calling test (or fixture) when the fixture is missing."""
    reason = fixture_missing(d)
    if reason:
        pytest.skip(reason)
    return d


def skip_without(d: Path) -> pytest.MarkDecorator:
    """A mark that skips a test (or, as `pytestmark`, a module) when the fixture d is missing."""
    reason = fixture_missing(d)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(scope="session")
def owl3_fixture_dir() -> Path:
    return require_fixture(OWL3_FIXTURE)


@pytest.fixture(scope="session")
def owl3_ref(owl3_fixture_dir):
    from safetensors.torch import load_file

    return load_file(str(owl3_fixture_dir / "reference_outputs.safetensors"))


@pytest.fixture(scope="session")
def owl3_tiny(owl3_fixture_dir):
    from hyperowl.checkpoint import load_owl3

    return load_owl3(owl3_fixture_dir)


def png_data_url(color=(200, 30, 30), size=(60, 40)) -> str:
    """A plain-colour PNG as a data URL (an image part for the server's tests)."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


def features(model, pixel_values):
    """Image features for engine requests (the engine takes features, never pixels)."""
    if pixel_values is None:
        return None
    with torch.no_grad():
        return model.encode_images(pixel_values)


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
