"""The model-family table: the one place that knows which families exist and what differs between them.

Design note
-----------
A family is a row of data: its config class, model class, processor, checkpoint key maps, chat template,
stop tokens, pad token and how many LLM rows / feature tokens one image becomes. Loading, saving,
training, serving, evaluation and the CLI ask this table (`family_of(config)`,
`family_for_checkpoint(config.json, tensor names)`) instead of testing class names or flags, so adding a
family means a new row here plus that family's own model and processor files.

    owl3-240728   Qwen2 + hyper attention (adaptive gate), ChatML, v2 cut template
    owl3-241101   Qwen2 + hyper attention (one fused attention call), ChatML, v3 cut template + frame marks
    owl2          LLaMA-2 + modality-adaptive module, visual abstractor, USER/ASSISTANT prompt

Import layer: above config, models and processing (it names their classes), below checkpoint, the
encoder, the engine and everything that drives a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from tokenizers import Tokenizer

from . import keymaps
from .config import Owl2Config, Owl3Config
from .errors import CheckpointError
from .models.owl2 import Owl2Model
from .models.owl3 import Owl3Model
from .processing.chat import STOP_TOKENS
from .processing.owl2 import EOS_TOKEN, Owl2Processor
from .processing.processor import Owl3Processor


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_type: str  # config.json's model_type
    config_cls: type
    config_from_raw: Callable[[dict], Any]  # config.json -> our config
    model_cls: type
    key_map: keymaps.KeyMap  # official names -> ours
    inverse_key_map: keymaps.KeyMap  # ours -> official names (saving)
    ignored: Callable[[Any, bool], list[str]]  # (config, tied) -> official names we knowingly skip
    template: str  # "chatml" | "owl2" (rendered by the family's processor)
    stop_tokens: tuple[str, ...]  # token strings that end an answer
    stops_at_config_eos: bool  # the config's eos_token_id ends an answer too (Owl2's checkpoints name it)
    pad_token: str | None  # token used to pad batches (None: the config's pad_token_id)
    make_processor: Callable[[Tokenizer, Any, bool | None], Any]  # (tokenizer, config, cut) -> processor
    llm_rows_per_image: Callable[[Any], int]  # rows one image tensor takes in the LLM sequence
    feature_tokens: Callable[[Any], int]  # T of the features [N, T, H] of one image tensor
    variant: str | None = None  # Owl3 generation, told apart by tensor names

    # -- questions the rest of the code asks ----------------------------------------------------------------
    def config_from_hf(self, raw: dict, where: str = "config.json") -> Any:
        from .config_schema import check_config  # pydantic: imported when a checkpoint is read

        check_config(self.model_type, raw, where)  # one line naming the key, its value and what is expected
        try:
            return self.config_from_raw(raw)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: not a valid {self.description} config ({type(e).__name__}: {e})") from None

    def processor(self, tokenizer: Tokenizer, config: Any, cut: bool | None = None) -> Any:
        return self.make_processor(tokenizer, config, cut)

    def stop_ids(self, tokenizer: Tokenizer, config: Any = None) -> tuple[int, ...]:
        ids = [tokenizer.token_to_id(t) for t in self.stop_tokens]
        if config is not None and self.stops_at_config_eos:
            ids.append(config.eos_token_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def pad_id(self, tokenizer: Tokenizer | None, config: Any) -> int:
        if self.pad_token is None:
            return config.pad_token_id
        found = tokenizer.token_to_id(self.pad_token) if tokenizer is not None else None
        return found or 0

    def after_load(self, model: Any, device: Any) -> None:
        """Buffers a checkpoint does not carry (Owl2's abstractor sin-cos tables) computed on `device`."""
        init = getattr(model, "init_tables", None)
        if init is not None:
            init(device)


def _owl3_processor(tokenizer: Tokenizer, cfg: Owl3Config, cut: bool | None) -> Owl3Processor:
    return Owl3Processor(tokenizer, variant=cfg.variant, image_size=cfg.vision.image_size,
                         cut=cfg.cut_enable if cut is None else cut)


def _owl2_processor(tokenizer: Tokenizer, cfg: Owl2Config, cut: bool | None) -> Owl2Processor:
    return Owl2Processor(tokenizer, image_size=cfg.vision.image_size, image_aspect_ratio=cfg.image_aspect_ratio)


def _owl3(variant: str, description: str) -> Family:
    return Family(
        name=f"owl3-{variant}", description=description, model_type="mplugowl3", config_cls=Owl3Config,
        config_from_raw=lambda raw: Owl3Config.from_hf_dict(raw, variant=variant), model_cls=Owl3Model,
        key_map=keymaps.OWL3_KEYS, inverse_key_map=keymaps.OWL3_INVERSE, ignored=keymaps.owl3_ignored,
        template="chatml", stop_tokens=STOP_TOKENS, stops_at_config_eos=False, pad_token="<|endoftext|>",
        make_processor=_owl3_processor, llm_rows_per_image=lambda cfg: 1,
        feature_tokens=lambda cfg: cfg.vision.tokens_per_image, variant=variant)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        _owl3("240728", "mPLUG-Owl3 (240728: gated hyper attention)"),
        _owl3("241101", "mPLUG-Owl3 (241101: fused hyper attention)"),
        Family(name="owl2", description="mPLUG-Owl2 (LLaMA + modality-adaptive module)", model_type="mplug_owl2",
               config_cls=Owl2Config, config_from_raw=Owl2Config.from_hf_dict, model_cls=Owl2Model,
               key_map=keymaps.OWL2_KEYS, inverse_key_map=keymaps.OWL2_INVERSE, ignored=keymaps.owl2_ignored,
               template="owl2", stop_tokens=(EOS_TOKEN,), stops_at_config_eos=True, pad_token=None,
               make_processor=_owl2_processor, llm_rows_per_image=lambda cfg: cfg.tokens_per_image,
               feature_tokens=lambda cfg: cfg.tokens_per_image),
    )
}


def family_of(config_or_model: Any) -> Family:
    """The family of a config (or of a model, via its config)."""
    cfg = getattr(config_or_model, "config", config_or_model)
    for f in FAMILIES.values():
        if isinstance(cfg, f.config_cls) and (f.variant is None or getattr(cfg, "variant", None) == f.variant):
            return f
    raise TypeError(f"no model family for {type(cfg).__name__}")


def family_for_checkpoint(raw: dict, tensor_names: Iterable[str], where: str = "config.json") -> Family:
    """The family of a checkpoint: config.json's model_type, then (Owl3) the generation from tensor names."""
    model_type = raw.get("model_type")
    rows = [f for f in FAMILIES.values() if f.model_type == model_type]
    if not rows:
        known = sorted({f.model_type for f in FAMILIES.values()})
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (expected one of {', '.join(known)})")
    if len(rows) == 1:
        return rows[0]
    variant = keymaps.detect_variant(tensor_names)
    return next(f for f in rows if f.variant == variant)
