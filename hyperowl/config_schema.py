"""config.json checked against its family's schema before a config is built from it.

Design note: a checkpoint's config.json is user input. Built straight into `Owl3Config` / `Owl2Config`, a
wrong value failed deep inside: a negative hidden_size as torch's "negative dimension", heads that do not
divide hidden_size as a bare ValueError, a missing key as KeyError. Here each family's layout is a pydantic
model of the keys hyperowl reads (official configs carry many more: extra keys are allowed and ignored),
with the defaults of config.py, in two steps:
  1. each key: required or not, its type (strict: 64.0 or "64" is not an integer, true is not a number) and
     its range;
  2. the rules between keys, on the values with the defaults filled in: heads divide hidden_size into even
     (rotary) head widths, KV heads divide heads, hyper_layers lie in 1..num_hidden_layers, token ids below
     vocab_size; for Owl2 the abstractor's input width and grid are the ViT's.
The first problem becomes one line naming the file, the key (dotted for nested keys), the value as written
in the file, and what is expected:
    /ckpt/config.json: num_attention_heads = 5: expected a divisor of hidden_size (64)
The keys follow `from_hf_dict` in config.py: a key it reads with `or` may be null, one it reads with a default
may be absent but not null. pydantic is imported when a checkpoint is loaded, not with hyperowl.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .config import AbstractorConfig, ClipVitConfig, Owl2Config, Owl3Config, SiglipConfig
from .errors import CheckpointError

PosInt = Annotated[StrictInt, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


_SIG, _O3 = SiglipConfig(), Owl3Config()


class SiglipSchema(_Schema):
    """Owl3's `vision_config` (SigLIP)."""

    hidden_size: PosInt = _SIG.hidden_size
    intermediate_size: PosInt = _SIG.intermediate_size
    num_hidden_layers: PosInt = _SIG.num_layers
    num_attention_heads: PosInt = _SIG.num_heads
    image_size: PosInt = _SIG.image_size
    patch_size: PosInt = _SIG.patch_size
    layer_norm_eps: PosFloat = _SIG.layer_norm_eps


class _LLMSchema(_Schema):
    """The text LLM's keys, the same for Qwen2 (Owl3) and LLaMA (Owl2)."""

    vocab_size: PosInt
    hidden_size: PosInt
    intermediate_size: PosInt
    num_hidden_layers: PosInt
    num_attention_heads: PosInt
    rope_theta: Optional[PosFloat] = None
    max_position_embeddings: PosInt = _O3.max_position_embeddings
    tie_word_embeddings: Optional[StrictBool] = None
    vision_batch_size: PosInt = _O3.vision_batch_size
    eos_token_id: Any = None  # an id or a non-empty list of ids: checked with the rules between keys


class Owl3Schema(_LLMSchema):
    num_key_value_heads: PosInt = None  # type: ignore[assignment]  # absent: num_attention_heads
    rms_norm_eps: PosFloat = _O3.rms_norm_eps
    hyper_layers: list[StrictInt] = list(_O3.hyper_layers)
    vision_config: Optional[SiglipSchema] = None
    bos_token_id: Optional[TokenId] = _O3.bos_token_id
    cut_enable: Optional[StrictBool] = None


_VIT, _ABS, _O2 = ClipVitConfig(), AbstractorConfig(), Owl2Config()


class ClipVitSchema(_Schema):
    """Owl2's `visual_config.visual_model`."""

    hidden_size: PosInt = _VIT.hidden_size
    intermediate_size: PosInt = _VIT.intermediate_size
    num_hidden_layers: PosInt = _VIT.num_layers
    num_attention_heads: PosInt = _VIT.num_heads
    image_size: PosInt = _VIT.image_size
    patch_size: PosInt = _VIT.patch_size
    layer_norm_eps: PosFloat = _VIT.layer_norm_eps
    hidden_act: str = _VIT.hidden_act
    use_cls_token: Optional[StrictBool] = None
    use_post_layernorm: Optional[StrictBool] = None


class AbstractorSchema(_Schema):
    """Owl2's `visual_config.visual_abstractor`."""

    hidden_size: PosInt = _ABS.hidden_size
    num_hidden_layers: PosInt = _ABS.num_layers
    num_attention_heads: PosInt = _ABS.num_heads
    intermediate_size: PosInt = _ABS.intermediate_size
    num_learnable_queries: PosInt = _ABS.num_queries
    grid_size: PosInt = _ABS.grid_size
    encoder_hidden_size: PosInt = _ABS.encoder_hidden_size
    layer_norm_eps: PosFloat = _ABS.layer_norm_eps
    use_cls_token: Optional[StrictBool] = None
    add_v2t_pos_emb: Optional[Literal[False]] = None  # no released checkpoint uses it; not implemented


class Owl2VisualSchema(_Schema):
    visual_model: Optional[ClipVitSchema] = None
    visual_abstractor: Optional[AbstractorSchema] = None


class Owl2Schema(_LLMSchema):
    num_key_value_heads: Optional[PosInt] = None
    rms_norm_eps: PosFloat = _O2.rms_norm_eps
    max_position_embeddings: PosInt = _O2.max_position_embeddings
    rope_scaling: None = None  # not supported for mPLUG-Owl2
    attention_bias: Optional[StrictBool] = None
    visual_config: Optional[Owl2VisualSchema] = None
    bos_token_id: TokenId = _O2.bos_token_id
    pad_token_id: Optional[TokenId] = None
    image_aspect_ratio: Optional[Literal["resize", "pad", "crop", "square"]] = None


class _Invalid(Exception):
    def __init__(self, key: str, value: Any, expected: str, missing: bool = False) -> None:
        super().__init__(key)
        self.key, self.value, self.expected, self.missing = key, value, expected, missing


def _show(value: Any) -> str:
    """A value as it is written in config.json."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_FLOAT_KEYS = {"rope_theta", "rms_norm_eps", "layer_norm_eps"}  # the PosFloat fields; every other bound is on an integer
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "list_type": "a list", "model_type": "an object {...}",
             "model_attributes_type": "an object {...}", "none_required": "null", "string_type": "a string"}


def _from_pydantic(err: ValidationError) -> _Invalid:
    e = err.errors()[0]
    key = _key(e["loc"])
    if e["type"] == "missing":
        return _Invalid(key, None, "an integer > 0 (this key is required)", missing=True)
    ctx = e.get("ctx") or {}
    if e["type"] in ("greater_than", "greater_than_equal"):
        op, bound = (">", ctx.get("gt")) if e["type"] == "greater_than" else (">=", ctx.get("ge"))
        what = "a number" if e["loc"][-1] in _FLOAT_KEYS else "an integer"
        expected = f"{what} {op} {bound}"
    elif e["type"] == "literal_error":
        expected = "one of " + str(ctx.get("expected", "")).replace("'", '"')
    elif key == "rope_scaling":
        expected = "null (rope scaling is not supported for mPLUG-Owl2)"
    else:
        expected = _EXPECTED.get(e["type"], e["msg"].removeprefix("Input should be "))
    return _Invalid(key, e["input"], expected)


def _check_llm(c: _LLMSchema, kv_heads: int, eos_default: int) -> None:
    """Rules between the LLM's keys (both families)."""
    if c.hidden_size % c.num_attention_heads:
        raise _Invalid("num_attention_heads", c.num_attention_heads, f"a divisor of hidden_size ({c.hidden_size})")
    if (c.hidden_size // c.num_attention_heads) % 2:
        raise _Invalid("num_attention_heads", c.num_attention_heads, "heads of an even width (rotary embeddings): "
                       f"hidden_size ({c.hidden_size}) / num_attention_heads is odd")
    if c.num_attention_heads % kv_heads:
        raise _Invalid("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({c.num_attention_heads})")
    eos = c.eos_token_id if "eos_token_id" in c.model_fields_set else eos_default
    ids = eos if isinstance(eos, list) else [eos]
    if eos is None:  # null: the config names no end token (a base text LLM); the family's stop tokens end answers
        ids = [0]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < c.vocab_size for i in ids):
        raise _Invalid("eos_token_id", eos, f"a token id (or a non-empty list of them) in 0..{c.vocab_size - 1} "
                       "(below vocab_size)")
    bos = getattr(c, "bos_token_id", None)
    if bos is not None and bos >= c.vocab_size:
        raise _Invalid("bos_token_id", bos, f"a token id in 0..{c.vocab_size - 1} (below vocab_size)")


def _check_tower(prefix: str, hidden: int, heads: int, image: int, patch: int) -> None:
    if hidden % heads:
        raise _Invalid(f"{prefix}.num_attention_heads", heads, f"a divisor of {prefix}.hidden_size ({hidden})")
    if patch > image:
        raise _Invalid(f"{prefix}.patch_size", patch, f"at most {prefix}.image_size ({image})")


def _check_owl3(c: Owl3Schema) -> None:
    _check_llm(c, c.num_key_value_heads or c.num_attention_heads, _O3.eos_token_id)
    bad = [i for i, n in enumerate(c.hyper_layers) if not 1 <= n <= c.num_hidden_layers]
    if bad:
        raise _Invalid(f"hyper_layers[{bad[0]}]", c.hyper_layers[bad[0]],
                       f"a 1-based layer number in 1..{c.num_hidden_layers} (num_hidden_layers)")
    v = c.vision_config or SiglipSchema()
    _check_tower("vision_config", v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size)


def _check_owl2(c: Owl2Schema) -> None:
    _check_llm(c, c.num_key_value_heads or c.num_attention_heads, _O2.eos_token_id)
    vc = c.visual_config or Owl2VisualSchema()
    v, a = vc.visual_model or ClipVitSchema(), vc.visual_abstractor or AbstractorSchema()
    vm, ab = "visual_config.visual_model", "visual_config.visual_abstractor"
    _check_tower(vm, v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size)
    if a.hidden_size % a.num_attention_heads:
        raise _Invalid(f"{ab}.num_attention_heads", a.num_attention_heads, f"a divisor of {ab}.hidden_size ({a.hidden_size})")
    if a.hidden_size % 4:
        raise _Invalid(f"{ab}.hidden_size", a.hidden_size, "a multiple of 4 (2-D sin-cos position tables)")
    if a.encoder_hidden_size != v.hidden_size:
        raise _Invalid(f"{ab}.encoder_hidden_size", a.encoder_hidden_size,
                       f"{v.hidden_size}, the same as {vm}.hidden_size (the abstractor reads the ViT's features)")
    if a.grid_size != v.image_size // v.patch_size:
        raise _Invalid(f"{ab}.grid_size", a.grid_size, f"{v.image_size // v.patch_size}, the ViT's patches a side "
                       f"({vm}.image_size {v.image_size} / patch_size {v.patch_size})")
    vit_cls = _VIT.use_cls_token if v.use_cls_token is None else v.use_cls_token
    abs_cls = _ABS.use_cls_token if a.use_cls_token is None else a.use_cls_token
    if vit_cls != abs_cls:
        raise _Invalid(f"{ab}.use_cls_token", a.use_cls_token, f"the same as {vm}.use_cls_token ({_show(vit_cls)})")


SCHEMAS: dict[str, tuple[type[_Schema], Any]] = {  # config.json's model_type -> (schema, rules between keys)
    "mplugowl3": (Owl3Schema, _check_owl3),
    "mplug_owl2": (Owl2Schema, _check_owl2),
}


def check_config(model_type: str, raw: dict, where: str = "config.json") -> None:
    """Raise CheckpointError (one line: file, key, value, what is expected) unless `raw` (a parsed
    config.json of `model_type`) fits its family's schema. Unknown model types are not checked here."""
    if model_type not in SCHEMAS:
        return
    schema, rules = SCHEMAS[model_type]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object {{...}}, got {type(raw).__name__}")
    try:
        try:
            rules(schema.model_validate(raw))
        except ValidationError as e:
            raise _from_pydantic(e) from None
    except _Invalid as bad:
        what = f"{bad.key} is missing" if bad.missing else f"{bad.key} = {_show(bad.value)}"
        raise CheckpointError(f"{where}: {what}: expected {bad.expected}") from None
