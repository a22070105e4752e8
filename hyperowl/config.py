"""Typed configs for the models; presets are data.

Design note: one frozen dataclass per concept. `Owl3Config` is what our modules read; it converts to and
from the official `config.json` (model_type `mplugowl3`, Qwen2 fields + `hyper_layers` + nested SigLIP
`vision_config`) so checkpoints we save load in the official code and vice versa. The 240728/241101
variant is a property of the checkpoint (detected from its tensor names by `checkpoint.py`), never a user
choice. `hyper_layers` keeps the official 1-based convention; `is_hyper(i)` answers for 0-based index i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("240728", "241101")


@dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "SiglipConfig":
        base = cls()
        return cls(
            hidden_size=d.get("hidden_size", base.hidden_size),
            intermediate_size=d.get("intermediate_size", base.intermediate_size),
            num_layers=d.get("num_hidden_layers", base.num_layers),
            num_heads=d.get("num_attention_heads", base.num_heads),
            image_size=d.get("image_size", base.image_size),
            patch_size=d.get("patch_size", base.patch_size),
            layer_norm_eps=d.get("layer_norm_eps", base.layer_norm_eps),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_eps": self.layer_norm_eps,
        }


@dataclass(frozen=True)
class Owl3Config:
    vocab_size: int = 151851
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hyper_layers: tuple[int, ...] = (1, 9, 17, 25)  # 1-based, as in the official config
    variant: str = "240728"
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    vision_batch_size: int = 16  # images per vision-tower chunk (bounded activation memory)
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    cut_enable: bool = True  # the processor's default for cutting big images into crops + global view

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        bad = [i for i in self.hyper_layers if not 1 <= i <= self.num_layers]
        if bad:
            raise ValueError(f"hyper_layers are 1-based and must lie in 1..{self.num_layers}; got {bad}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_hyper(self, index: int) -> bool:
        """Whether decoder layer `index` (0-based) is a hyper-attention layer."""
        return (index + 1) in self.hyper_layers

    def replace(self, **kw: Any) -> "Owl3Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], variant: str = "240728") -> "Owl3Config":
        base = cls()
        eos = d.get("eos_token_id", base.eos_token_id)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            # newer transformers write rope_theta inside "rope_parameters"
            rope_theta=float(d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or base.rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", base.rms_norm_eps)),
            max_position_embeddings=d.get("max_position_embeddings", base.max_position_embeddings),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hyper_layers=tuple(d.get("hyper_layers", base.hyper_layers)),
            variant=variant,
            vision=SiglipConfig.from_hf_dict(d.get("vision_config") or {}),
            vision_batch_size=d.get("vision_batch_size", base.vision_batch_size),
            bos_token_id=d.get("bos_token_id", base.bos_token_id),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            cut_enable=bool(d.get("cut_enable", True)),
        )

    def summary(self) -> dict[str, Any]:
        """What `hyperowl info` shows about this architecture."""
        v = self.vision
        return {"variant": self.variant, "hidden_size": self.hidden_size, "layers": self.num_layers,
                "heads": f"{self.num_heads} (kv {self.num_kv_heads})", "hyper_layers": list(self.hyper_layers),
                "vocab_size": self.vocab_size, "tied_embeddings": self.tie_word_embeddings,
                "vision": f"SigLIP {v.hidden_size}x{v.num_layers} layers, {v.image_size}px, {v.tokens_per_image} tokens/image"}

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json layout (so the official loaders read what we save)."""
        return {
            "architectures": ["mPLUGOwl3Model"],
            # the official remote code (configuration_/modeling_mplugowl3.py, shipped with the released
            # checkpoints) is found through auto_map by AutoConfig/AutoModel(trust_remote_code=True)
            "auto_map": {"AutoConfig": "configuration_mplugowl3.mPLUGOwl3Config",
                         "AutoModel": "modeling_mplugowl3.mPLUGOwl3Model",
                         "AutoModelForCausalLM": "modeling_mplugowl3.mPLUGOwl3Model"},
            "model_type": "mplugowl3",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "hyper_layers": list(self.hyper_layers),
            "vision_config": self.vision.to_hf_dict(),
            "vision_batch_size": self.vision_batch_size,
            "image_size": self.vision.image_size,
            "patch_size": self.vision.patch_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hyperowl_variant": self.variant,
            "cut_enable": self.cut_enable,
        }


_SO400M = SiglipConfig()

# Presets are data: the released shapes, and tiny sizes for tests.
PRESETS: dict[str, Owl3Config] = {
    "owl3-7b-240728": Owl3Config(),
    "owl3-7b-241101": Owl3Config(variant="241101", hyper_layers=(1, 9, 17, 25)),
    "owl3-2b-241014": Owl3Config(
        hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2,
        tie_word_embeddings=True, hyper_layers=(7, 15, 23, 26), variant="241101",
    ),
    "owl3-1b-241014": Owl3Config(
        hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        tie_word_embeddings=True, hyper_layers=(7, 15, 23), variant="241101",
    ),
    "tiny-240728": Owl3Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        rope_theta=1e4, max_position_embeddings=512, hyper_layers=(1, 3), variant="240728",
        vision=SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            image_size=28, patch_size=14),
        bos_token_id=1, eos_token_id=2,
    ),
}
PRESETS["tiny-241101"] = PRESETS["tiny-240728"].replace(variant="241101")
# The embedded default model (hyperowl/assets/owl3-synthetic): small enough to train from scratch on 2 CPU cores.
PRESETS["owl3-synthetic"] = Owl3Config(
    vocab_size=1024, hidden_size=256, intermediate_size=640, num_layers=4, num_heads=4, num_kv_heads=2,
    rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=True, hyper_layers=(2, 4), variant="240728",
    vision=SiglipConfig(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, image_size=64, patch_size=8),
    vision_batch_size=64, bos_token_id=0, eos_token_id=2, cut_enable=False,
)


# ==========================================================================================================
# mPLUG-Owl2 (model_type `mplug_owl2`): LLaMA + modality-adaptive module, CLIP-style ViT, visual abstractor.
# Separate from Owl3Config on purpose: the two models share building blocks, not configuration.
# ==========================================================================================================
@dataclass(frozen=True)
class ClipVitConfig:
    """Owl2's CLIP-like ViT (`visual_config.visual_model`); defaults = the released ViT-L/14 at 448."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "quick_gelu"
    use_cls_token: bool = True
    use_post_layernorm: bool = True

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2 + int(self.use_cls_token)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ClipVitConfig":
        b = cls()
        return cls(
            hidden_size=d.get("hidden_size", b.hidden_size), intermediate_size=d.get("intermediate_size", b.intermediate_size),
            num_layers=d.get("num_hidden_layers", b.num_layers), num_heads=d.get("num_attention_heads", b.num_heads),
            image_size=d.get("image_size", b.image_size), patch_size=d.get("patch_size", b.patch_size),
            layer_norm_eps=float(d.get("layer_norm_eps", b.layer_norm_eps)), hidden_act=d.get("hidden_act", b.hidden_act),
            use_cls_token=bool(d.get("use_cls_token", b.use_cls_token)),
            use_post_layernorm=bool(d.get("use_post_layernorm", b.use_post_layernorm)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size, "projection_dim": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads, "num_channels": 3,
            "image_size": self.image_size, "patch_size": self.patch_size, "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps, "attention_dropout": 0.0, "use_flash_attn": False,
            "use_post_layernorm": self.use_post_layernorm, "use_cls_token": self.use_cls_token,
            "initializer_range": 0.02, "initializer_factor": 1.0,
        }


@dataclass(frozen=True)
class AbstractorConfig:
    """Owl2's visual abstractor (`visual_config.visual_abstractor`); defaults = the released one."""

    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816
    num_queries: int = 64
    grid_size: int = 32
    encoder_hidden_size: int = 1024
    layer_norm_eps: float = 1e-6
    use_cls_token: bool = True
    add_v2t_pos_emb: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "AbstractorConfig":
        b = cls()
        return cls(
            hidden_size=d.get("hidden_size", b.hidden_size), num_layers=d.get("num_hidden_layers", b.num_layers),
            num_heads=d.get("num_attention_heads", b.num_heads), intermediate_size=d.get("intermediate_size", b.intermediate_size),
            num_queries=d.get("num_learnable_queries", b.num_queries), grid_size=d.get("grid_size", b.grid_size),
            encoder_hidden_size=d.get("encoder_hidden_size", b.encoder_hidden_size),
            layer_norm_eps=float(d.get("layer_norm_eps", b.layer_norm_eps)),
            use_cls_token=bool(d.get("use_cls_token", b.use_cls_token)), add_v2t_pos_emb=bool(d.get("add_v2t_pos_emb", False)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "add_v2t_pos_emb": self.add_v2t_pos_emb, "use_cls_token": self.use_cls_token,
            "num_learnable_queries": self.num_queries, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size, "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": self.layer_norm_eps, "encoder_hidden_size": self.encoder_hidden_size, "grid_size": self.grid_size,
            "initializer_range": 0.02,
        }


@dataclass(frozen=True)
class Owl2Config:
    """mPLUG-Owl2 = LLaMA fields + `visual_config` {visual_model, visual_abstractor}. Defaults: llama2-7b."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # the official multiway K/V cannot do GQA; we can
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    vision: ClipVitConfig = field(default_factory=ClipVitConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    vision_batch_size: int = 16  # images per ViT chunk
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    image_aspect_ratio: str = "resize"  # preprocessing path: resize (README) | pad | crop (plain CLIP)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.abstractor.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError("visual_abstractor.encoder_hidden_size must equal visual_model.hidden_size")
        if self.image_aspect_ratio not in ("resize", "pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be resize, pad or crop, got {self.image_aspect_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_image(self) -> int:
        """Rows each image becomes in the LLM sequence: the queries + the end-of-image row."""
        return self.abstractor.num_queries + 1

    def replace(self, **kw: Any) -> "Owl2Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Owl2Config":
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported for mPLUG-Owl2")
        b = cls()
        vc = d.get("visual_config") or {}
        eos = d.get("eos_token_id", b.eos_token_id)
        aspect = d.get("image_aspect_ratio") or b.image_aspect_ratio
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            rope_theta=float(d.get("rope_theta") or b.rope_theta), rms_norm_eps=float(d.get("rms_norm_eps", b.rms_norm_eps)),
            max_position_embeddings=d.get("max_position_embeddings", b.max_position_embeddings),
            attention_bias=bool(d.get("attention_bias", False)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            vision=ClipVitConfig.from_hf_dict(vc.get("visual_model") or {}),
            abstractor=AbstractorConfig.from_hf_dict(vc.get("visual_abstractor") or {}),
            vision_batch_size=d.get("vision_batch_size", b.vision_batch_size),
            bos_token_id=d.get("bos_token_id", b.bos_token_id), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id", b.pad_token_id) or 0,
            image_aspect_ratio="crop" if aspect == "square" else aspect,
        )

    def summary(self) -> dict[str, Any]:
        """What `hyperowl info` shows about this architecture."""
        v, a = self.vision, self.abstractor
        return {"hidden_size": self.hidden_size, "layers": self.num_layers,
                "heads": f"{self.num_heads} (kv {self.num_kv_heads})", "vocab_size": self.vocab_size,
                "vision": f"CLIP ViT {v.hidden_size}x{v.num_layers} layers, {v.image_size}px, {v.tokens_per_image} tokens",
                "abstractor": f"{a.num_layers} layers, {a.num_queries} queries -> {self.tokens_per_image} LLM rows/image"}

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["MPLUGOwl2LlamaForCausalLM"], "model_type": "mplug_owl2", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "rope_theta": self.rope_theta, "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "tie_word_embeddings": self.tie_word_embeddings, "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "visual_config": {"visual_model": self.vision.to_hf_dict(), "visual_abstractor": self.abstractor.to_hf_dict()},
            "vision_batch_size": self.vision_batch_size, "image_aspect_ratio": self.image_aspect_ratio,
            "initializer_range": 0.02, "use_cache": True,  # read by the official LlamaConfig-based class
        }


OWL2_PRESETS: dict[str, Owl2Config] = {
    "owl2-llama2-7b": Owl2Config(),
    # the shape of tests/fixtures/owl2-tiny (MHA, like the official code needs)
    "owl2-tiny": Owl2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
        max_position_embeddings=256,
        vision=ClipVitConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, num_queries=4,
                                    grid_size=2, encoder_hidden_size=32),
    ),
}
