"""The model a run starts from, its processor and the tokenizer.json its checkpoints ship.

Design note. `recipe.init` picks one of four routes, tried in this order:

    from                      a checkpoint of any family (the family table reads its config.json);
                              its tokenizer.json comes along
    text_llm + Owl2 preset    `upgrade_owl2`: a LLaMA checkpoint as the LLM, the preset's visual side,
                              the LLaMA's tokenizer plus `<|image|>`
    text_llm + vision         `upgrade`: a Qwen2 checkpoint + a SigLIP tower + init.hyper_layers (Owl3),
                              the Qwen2 tokenizer plus the media tokens
    preset                    a fresh model of the preset's shape (init.llm / init.hyper_layers override
                              it), random weights (`init_weights`), a tokenizer trained on the data or
                              copied; per family: an Owl3 preset may take a pretrained SigLIP tower
                              (init.vision), an Owl2 model starts its modality-adaptive visual side
                              equal to the text side (`upgrade.init_visual_from_text`)

Everything that differs between families after that (processor, pad id, rows per image, saving) is
asked of the family table (`hyperowl.families`). Files every rank reads (the tokenizer) are written by
rank 0 while the others wait (`on_rank0`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint
from ..config import OWL2_PRESETS, PRESETS, Owl2Config, Owl3Config
from ..errors import InputError
from ..families import family_of
from ..models.owl2 import Owl2Model
from ..models.owl3 import Owl3Model
from ..processing.processor import load_tokenizer
from .recipe import INIT_SCHEMES, Recipe
from .tokenizer import train_tokenizer, with_image_token, with_media_tokens

log = logging.getLogger(__name__)

# Residual-branch output projections (scaled down by depth in the fan_in scheme).
_OUT_PROJ = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "mlp.fc2.weight")


def init_weights(model: Owl3Model | Owl2Model, seed: int, scheme: str = "normal") -> None:
    """Random init for training from scratch; unit norms and zero biases in both schemes.

    normal: every matrix and embedding N(0, 0.02) (GPT-2 / HF default).
    fan_in: matrices N(0, 1/fan_in), residual output projections further / sqrt(2 * layers of their stack),
        token/position embeddings N(0, 0.02) (the patch embedding is a matrix). Why it exists: in a narrow
        model (width 128-256) 0.02 is 3-4x below 1/sqrt(width), so attention logits start ~10x flatter. On the
        embedded model it measured no better (README, embedded-model probes); the shipped recipe uses normal.
    """
    if scheme not in INIT_SCHEMES:
        raise InputError(f"recipe: init.scheme {scheme!r} unknown; use one of {', '.join(INIT_SCHEMES)}")
    g = torch.Generator().manual_seed(seed)
    n_llm = max(1, len(getattr(getattr(model, "decoder", None), "layers", [])))
    n_vis = max(1, len(getattr(getattr(model, "vision", None), "layers", [])))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ffn_ln." in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                if scheme == "fan_in" and p.ndim >= 2 and ("embed" not in name or "patch_embed" in name) and "query" not in name:
                    std = p[0].numel() ** -0.5
                    if name.endswith(_OUT_PROJ):
                        std /= (2 * (n_vis if name.startswith("vision.") else n_llm)) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def on_rank0(fn: Callable[[], Any]) -> None:
    """Run fn on rank 0 while the other processes wait: a file that every rank then reads (the tokenizer)
    must be written once and completely, not by several processes at the same time."""
    if dist.is_initialized():
        if dist.get_rank() == 0:
            fn()
        dist.barrier()
    else:
        fn()


def make_processor(model: torch.nn.Module, tok_dir: Path, recipe: Recipe):
    """The family's processor over `tok_dir/tokenizer.json`, with the recipe's cut setting."""
    family = family_of(model)
    proc = family.processor(load_tokenizer(tok_dir), model.config, cut=recipe.data.cut)
    end = family.stop_tokens[0]  # the token the processor ends each answer with
    if proc.tokenizer.token_to_id(end) is None:
        log.warning("%s: the tokenizer has no %s token; answers end in the text '%s' instead", tok_dir, end, end)
    return proc


def build(recipe: Recipe, device: torch.device):
    """Model + processor from recipe.init; returns (model, processor, the tokenizer.json to ship with checkpoints)."""
    init = recipe.init
    if init.from_:
        model, tok_file = _from_checkpoint(recipe, device)
    elif init.text_llm and init.preset in OWL2_PRESETS:
        model, tok_file = _upgrade_owl2(recipe, device)
    elif init.text_llm or (init.vision and not init.preset):
        model, tok_file = _upgrade_owl3(recipe, device)
    elif init.preset:
        model, tok_file = _from_preset(recipe, device)
    else:
        raise InputError("recipe: init needs 'from', 'preset', 'text_llm' + 'vision' (Owl3) or 'text_llm' + an Owl2 'preset'")
    return model, make_processor(model, tok_file.parent, recipe), tok_file


# -- the four routes ------------------------------------------------------------------------------------------
def _from_checkpoint(recipe: Recipe, device: torch.device) -> tuple[torch.nn.Module, Path]:
    model, _, directory = load_checkpoint(recipe.init.from_, dtype=torch.float32, device=device)
    tok_file = directory / "tokenizer.json"
    if not tok_file.exists():
        raise InputError(f"init.from '{recipe.init.from_}': no tokenizer.json next to the weights")
    return model, tok_file


def _upgrade_owl2(recipe: Recipe, device: torch.device) -> tuple[Owl2Model, Path]:
    from .upgrade import upgrade_owl2

    init = recipe.init
    if init.vision or init.hyper_layers or init.tokenizer:
        raise InputError("recipe: an Owl2 upgrade takes init.text_llm (LLaMA, with its tokenizer.json) + init.preset "
                         "(the visual side's shapes); init.vision, init.hyper_layers and init.tokenizer do not apply")
    up = upgrade_owl2(init.text_llm, OWL2_PRESETS[init.preset], seed=recipe.seed)
    tok_file = Path(recipe.output) / "tokenizer.json"
    on_rank0(lambda: with_image_token(up.text_dir, tok_file))
    return up.model.to(device), tok_file


def _upgrade_owl3(recipe: Recipe, device: torch.device) -> tuple[Owl3Model, Path]:
    from .upgrade import upgrade

    init = recipe.init
    if not (init.text_llm and init.vision and init.hyper_layers):
        raise InputError("recipe: an upgrade needs init.text_llm, init.vision and init.hyper_layers")
    up = upgrade(init.text_llm, init.vision, init.hyper_layers, seed=recipe.seed)
    tok_file = Path(recipe.output) / "tokenizer.json"
    on_rank0(lambda: with_media_tokens(up.text_dir, tok_file))
    return up.model.to(device), tok_file


def _from_preset(recipe: Recipe, device: torch.device) -> tuple[torch.nn.Module, Path]:
    name = recipe.init.preset
    preset = {**PRESETS, **OWL2_PRESETS}.get(name)
    if preset is None:
        raise InputError(f"recipe: unknown preset {name!r}; known: {', '.join([*PRESETS, *OWL2_PRESETS])}")
    fresh = _FRESH_BY_FAMILY[family_of(preset).model_type]
    return fresh(recipe, preset, device)


def _preset_tokenizer(recipe: Recipe, preset: Owl3Config | Owl2Config, owl2: bool):
    """output/tokenizer.json (trained on the data, or init.tokenizer copied): (its path, the tokenizer, the
    vocabulary size to build: the tokenizer's, or init.vocab_size if larger)."""
    from tokenizers import Tokenizer

    init = recipe.init
    Path(recipe.output).mkdir(parents=True, exist_ok=True)
    tok_file = Path(recipe.output) / "tokenizer.json"
    if init.tokenizer == "train":
        def make_tokenizer() -> None:
            if not tok_file.exists():  # a resumed run keeps the tokenizer it started with
                vocab = init.vocab_size or preset.vocab_size
                train_tokenizer(Path(recipe.data.train), vocab, owl2=owl2).save(str(tok_file))

        on_rank0(make_tokenizer)  # every rank calls it: the barrier inside must be reached by all
    elif init.tokenizer:
        on_rank0(lambda: shutil.copy(init.tokenizer, tok_file))
    else:
        raise InputError("recipe: init.preset needs init.tokenizer (a tokenizer.json path, or 'train')")
    tok = Tokenizer.from_file(str(tok_file))
    return tok_file, tok, max(tok.get_vocab_size(), init.vocab_size or 0)


def _fresh_owl3(recipe: Recipe, preset: Owl3Config, device: torch.device) -> tuple[Owl3Model, Path]:
    """The preset's shapes (init.hyper_layers: these layers as hyper layers; init.llm: LM shape fields)."""
    init = recipe.init
    tok_file, _, vocab = _preset_tokenizer(recipe, preset, owl2=False)
    hyper = {"hyper_layers": tuple(init.hyper_layers)} if init.hyper_layers else {}
    try:
        cfg = preset.replace(vocab_size=vocab, cut_enable=recipe.data.cut, **hyper, **(init.llm or {}))
    except ValueError as e:
        raise InputError(f"recipe: init.hyper_layers / init.llm: {e}") from None
    model = Owl3Model(cfg).to(device)
    init_weights(model, recipe.seed, init.scheme)
    if init.vision:  # a pretrained tower (e.g. `hyperowl pretrain-vision`) under a fresh LM
        from .upgrade import load_vision_tower

        load_vision_tower(model, init.vision)
    return model, tok_file


def _fresh_owl2(recipe: Recipe, preset: Owl2Config, device: torch.device) -> tuple[Owl2Model, Path]:
    """The preset's shapes with the trained tokenizer's LLaMA ids; the visual side starts as the text side."""
    from .upgrade import init_visual_from_text

    init = recipe.init
    if init.vision:
        raise InputError("recipe: init.vision (a pretrained SigLIP tower) applies to Owl3 presets only")
    tok_file, tok, vocab = _preset_tokenizer(recipe, preset, owl2=True)
    ids = {k: tok.token_to_id(t) for k, t in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<unk>"))}
    try:
        cfg = preset.replace(vocab_size=vocab, **{k: v for k, v in ids.items() if v is not None}, **(init.llm or {}))
    except ValueError as e:
        raise InputError(f"recipe: init.llm: {e}") from None
    model = Owl2Model(cfg).to(device)
    init_weights(model, recipe.seed, init.scheme)
    init_visual_from_text(model)  # the modality-adaptive visual side starts as the LLM's own norms/K/V
    return model, tok_file


# How a family's model is made from one of its presets (keys: the family's config.json model_type).
_FRESH_BY_FAMILY: dict[str, Callable[[Recipe, Any, torch.device], tuple[torch.nn.Module, Path]]] = {
    "mplugowl3": _fresh_owl3,
    "mplug_owl2": _fresh_owl2,
}
