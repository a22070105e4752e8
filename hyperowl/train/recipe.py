"""Training recipes as data: which parts train in which stage, and how.

Design note: a recipe is one YAML file mapped onto typed dataclasses; unknown keys are errors (a typo
must not silently train something else), and every value is validated against its field's type by pydantic
(lax: `'2'` is 2, YAML 1.1's string `1e-4` is a float, `'no'` is false; `true` is never a number), a wrong
one is a one-line error naming the key, the value and the expected type. The two stages of the papers are presets of `trainable`:
- align (stage 1): LLM frozen; projection + the new hyper-attention parameters (visual K/V, gates) train,
  the vision tower optionally;
- instruct (stage 2): everything trains, the vision tower with layer-wise LR decay (0.9 in the paper).

Model-specific defaults: `align` leaves `vision` unset (None), and the trainer fills it per model
(`resolve_trainable`): mPLUG-Owl3 keeps the vision tower frozen (as before), mPLUG-Owl2 trains it, because
the Owl2 paper's pre-training stage trains the vision encoder, the visual abstractor (part `projector`) and
the modality-adaptive module's visual side (part `fusion`) with the LLM frozen. An explicit
`trainable: {vision: true|false}` always wins.
Example (see recipes/ in the repository):

    init: {from: path/to/checkpoint}          # or {preset: owl3-synthetic, tokenizer: tok.json}
                                              # or {preset: ..., tokenizer: train, vision: runs/vision} (pretrained tower)
                                              # Owl2: an mplug_owl2 checkpoint, {preset: owl2-tiny, tokenizer: train},
                                              # or {text_llm: path/to/llama, preset: owl2-llama2-7b}
    data: {train: data/train.jsonl, val: data/val.jsonl, on_error: skip, max_frames: 8, cut: false}
    stage: align                              # align | instruct | custom (then set `trainable`)
    optim: {lr: 1e-3, warmup_steps: 50, max_steps: 2000, layer_decay: 0.9}
    batch_size: 16
    output: runs/align

Phases: `phases:` lists partial recipes run one after another, each a complete training run (its own warmup
and cosine schedule over its `optim.max_steps`, a fresh optimizer). Phase k is the recipe's other keys
deep-merged with phase k's (mappings merge key by key, anything else replaces); phase 1 starts from the
recipe's `init`, phase k > 1 from phase k-1's final model unless it sets `init`; its seed is the recipe's
seed + k - 1 unless it sets one (a data file seen again is drawn in a new order); its output is
`<output>/phase-<k>`. `<output>/final` is the last phase's model and `<output>/log.jsonl` all phases' logs
with a running step. YAML anchors repeat a phase without copying it:

    phases:
      - {optim: {max_steps: 2600}}
      - &video {data: {train: data/video.jsonl}, optim: {warmup_steps: 20, max_steps: 150}}
      - &mix {optim: {warmup_steps: 20, max_steps: 150}}
      - *video
      - *mix
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

INIT_SCHEMES = ("normal", "fan_in")  # random init of a preset (see build.init_weights)
# init.llm: the LM shape fields a recipe may change in a preset (the tower's come from init.vision / the preset)
LLM_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "rope_theta")
# How the answer tokens of a batch are weighted in the loss: every token alike (token), every conversation
# alike (sample: mean over its answer tokens), or in between (square: a conversation's tokens weigh
# 1/sqrt(its answer tokens), InternVL 2.5's "square averaging"). Token weighting lets conversations with many
# answer tokens dominate the gradient (see README, Training).
LOSS_WEIGHTING = {"token": 0.0, "square": 0.5, "sample": 1.0}
LOGGERS = ("none", "tensorboard", "wandb")  # where metrics go besides output/log.jsonl (train/loggers.py)
STAGES = {
    "align": {"projector": True, "fusion": True, "llm": False, "vision": None},  # None: the model's default
    "instruct": {"projector": True, "fusion": True, "llm": True, "vision": True},
}


# What an unset (None) part means for each model family (see the module note).
MODEL_DEFAULTS: dict[str, dict[str, bool]] = {
    "mplugowl3": {"projector": False, "fusion": False, "llm": False, "vision": False},
    "mplug_owl2": {"projector": False, "fusion": False, "llm": False, "vision": True},
}


def resolve_trainable(trainable: dict[str, bool | None], model_type: str) -> dict[str, bool]:
    """Replace the parts left unset (None) by the model family's default; model_type as in config.json."""
    defaults = MODEL_DEFAULTS.get(model_type, MODEL_DEFAULTS["mplugowl3"])
    return {k: defaults[k] if v is None else bool(v) for k, v in trainable.items()}


@dataclass
class InitSpec:
    from_: str | None = None  # a checkpoint dir / hub id
    preset: str | None = None  # a config preset (random init), needs a tokenizer
    tokenizer: str | None = None  # tokenizer.json for a preset; "train" = train a BPE on the training data
    vocab_size: int | None = None  # for a trained tokenizer
    text_llm: str | None = None  # upgrade: a text-only Qwen2 checkpoint ... (Owl2: a LLaMA, with an owl2 `preset`)
    vision: str | None = None  # ... plus a SigLIP checkpoint (Owl3 only); with `preset`: a pretrained tower
    #                            (e.g. `hyperowl pretrain-vision`) under the preset's freshly initialised LM
    hyper_layers: list[int] | None = None  # ... and the hyper layers to add (1-based; Owl3 only; with an Owl3
    #                                        `preset`: replaces the preset's hyper layers)
    scheme: str = "normal"  # random init of a preset: normal (all N(0, 0.02)) | fan_in (see build.init_weights)
    llm: dict | None = None  # with `preset`: replace the preset's LM shape, e.g. {hidden_size: 384, num_layers: 6}


@dataclass
class DataSpec:
    train: str = ""
    val: str | None = None
    on_error: str = "fail"  # fail | skip
    max_frames: int = 8
    cut: bool = False
    max_length: int = 4096
    group_by_length: int = 0  # > 0: sort each window of that many optimizer steps' examples by length (less padding)
    # Processes that read, decode and tokenize the next micro-batches while the model trains (torch DataLoader
    # workers); 0 = in the training loop. null = 4 on a GPU (decoding must not starve it), 0 on CPU (the
    # workers would take the cores the model computes on; no gain measured on 2 cores).
    workers: int | None = None


@dataclass
class OptimSpec:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 0
    max_steps: int = 1000
    layer_decay: float = 0.9
    grad_clip: float = 1.0
    part_lr: dict[str, float] = field(default_factory=dict)  # LR multiplier per part, e.g. {vision: 3.0}


@dataclass
class LoraSpec:
    r: int = 0  # 0 = off
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    vision: bool = False  # also adapt the vision tower


@dataclass
class Recipe:
    init: InitSpec = field(default_factory=InitSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage: str = "align"
    trainable: dict[str, bool | None] = field(default_factory=dict)  # None = the model's default
    optim: OptimSpec = field(default_factory=OptimSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    batch_size: int = 8  # global batch (all processes, one optimizer step = batch_size * grad_accum examples)
    grad_accum: int = 1
    activation_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast where the device supports it fast (CUDA); CPU trains in fp32
    seed: int = 0
    output: str = "runs/train"
    log_every: int = 10
    save_every: int = 500
    save_total_limit: int = 0  # keep only the last K checkpoint-STEP directories (0 = keep all)
    logger: str = "none"  # none | tensorboard | wandb: also send the metrics there (optional extras; log.jsonl always)
    eval_every: int = 0
    num_threads: int = 0  # 0 = torch default
    loss_weighting: str = "token"  # token | square | sample (LOSS_WEIGHTING)
    phases: list[dict] = field(default_factory=list)  # partial recipes run in order (module note)

    def __post_init__(self) -> None:
        if self.stage not in (*STAGES, "custom"):
            raise InputError(f"recipe: stage must be align, instruct or custom, got {self.stage!r}")
        base = dict(STAGES.get(self.stage, {"projector": False, "fusion": False, "llm": False, "vision": False}))
        unknown = set(self.trainable) - set(base)
        if unknown:
            raise InputError(f"recipe: unknown trainable part(s) {sorted(unknown)}; use projector, fusion, llm, vision")
        bad = {k: v for k, v in self.trainable.items() if v is not None and not isinstance(v, bool)}
        if bad:
            raise InputError(f"recipe: trainable values must be true, false or null (model default); got {bad}")
        base.update(self.trainable)
        self._trainable_given = dict(self.trainable)  # what phases merge onto (a phase may change the stage)
        self.trainable = base
        bad_lr = {k: v for k, v in self.optim.part_lr.items()
                  if k not in base or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
        if bad_lr:
            raise InputError(f"recipe: optim.part_lr takes parts (projector, fusion, llm, vision) with positive "
                             f"multipliers; got {bad_lr}")
        llm = self.init.llm
        if llm is not None:
            if not isinstance(llm, dict) or not self.init.preset or set(llm) - set(LLM_SHAPE_FIELDS):
                raise InputError(f"recipe: init.llm (with init.preset) takes the LM's shape fields "
                                 f"({', '.join(LLM_SHAPE_FIELDS)}); got {llm!r}")
            wrong = {k: v for k, v in llm.items() if isinstance(v, bool)
                     or not isinstance(v, (int, float) if k == "rope_theta" else int) or v <= 0}
            if wrong:
                raise InputError(f"recipe: init.llm values must be positive integers (rope_theta: a positive "
                                 f"number); got {wrong}")
        if self.init.scheme not in INIT_SCHEMES:
            raise InputError(f"recipe: init.scheme must be one of {', '.join(INIT_SCHEMES)}; got {self.init.scheme!r}")
        if self.loss_weighting not in LOSS_WEIGHTING:
            raise InputError(f"recipe: loss_weighting must be one of {', '.join(LOSS_WEIGHTING)}; "
                             f"got {self.loss_weighting!r}")
        if self.logger not in LOGGERS:
            raise InputError(f"recipe: logger must be one of {', '.join(LOGGERS)}; got {self.logger!r}")
        if self.save_total_limit < 0:
            raise InputError(f"recipe: save_total_limit must be 0 (keep every checkpoint) or how many of the last "
                             f"checkpoints to keep; got {self.save_total_limit}")
        if self.data.on_error not in ("fail", "skip"):
            raise InputError("recipe: data.on_error must be fail or skip")
        if not isinstance(self.data.group_by_length, int) or self.data.group_by_length < 0:
            raise InputError(f"recipe: data.group_by_length must be 0 (off) or a number of optimizer steps whose "
                             f"examples are sorted by length together; got {self.data.group_by_length!r}")
        if self.data.workers is not None and (not isinstance(self.data.workers, int) or isinstance(self.data.workers, bool)
                                              or self.data.workers < 0):
            raise InputError(f"recipe: data.workers must be null (auto), 0 (load in the training loop) or a number "
                             f"of loader processes; got {self.data.workers!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> "Recipe":
        recipe = _build(cls, d, where)
        if recipe.phases:
            recipe.phase_recipes(where)  # every phase must be a valid recipe before anything trains
        return recipe

    def phase_recipes(self, where: str = "recipe") -> list["Recipe"]:
        """The phases as full recipes (module note): outputs `<output>/phase-<k>`, phase k > 1 starting from
        phase k-1's final model unless it sets `init`, seed + k - 1 unless it sets `seed`."""
        if not isinstance(self.phases, list) or not all(isinstance(p, dict) for p in self.phases):
            raise InputError(f"{where}: phases must be a list of partial recipes (mappings), e.g. "
                             f"[{{optim: {{max_steps: 1000}}}}, {{data: {{train: other.jsonl}}}}]")
        base = self.to_dict()  # as it is now: changes made after loading (--output, code) count
        base.pop("phases")
        base["trainable"] = dict(self._trainable_given)  # as written, not the stage's expansion
        out = []
        for k, phase in enumerate(self.phases, 1):
            at = f"{where}: phase {k}"
            for key in ("phases", "output"):
                if key in phase:
                    raise InputError(f"{at}: '{key}' cannot be set in a phase (outputs are <output>/phase-<k>)")
            d = _merge(base, {key: v for key, v in phase.items() if key != "init"})
            if "init" in phase:  # a phase's init replaces the recipe's (a preset and a checkpoint do not mix)
                d["init"] = phase["init"]
            elif k > 1:
                d["init"] = {"from": str(Path(self.output) / f"phase-{k - 1}" / "final")}
            d["seed"] = phase.get("seed", self.seed + k - 1)
            d["output"] = str(Path(self.output) / f"phase-{k}")
            try:
                out.append(_build(Recipe, d, at))
            except InputError as e:  # the checks after parsing say "recipe: ...": name the phase
                msg = str(e)
                raise InputError(msg if msg.startswith(at) else f"{at}: {msg.removeprefix('recipe: ')}") from None
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise InputError(f"recipe '{path}': no such file")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"recipe '{path}': not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise InputError(f"recipe '{path}': expected a mapping at the top level")
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["init"]["from"] = d["init"].pop("from_")
        return d


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else replaces."""
    d = copy.deepcopy(base)
    for k, v in over.items():
        d[k] = _merge(d[k], v) if isinstance(v, dict) and isinstance(d.get(k), dict) else copy.deepcopy(v)
    return d


def _build(cls, d: dict[str, Any], where: str, path: str = ""):
    """`d` onto the dataclass `cls`: unknown keys are errors, every value is validated against its field's type
    (pydantic, lax: YAML 1.1 reads `1e-4` as a string, which a float field accepts); `path` is the dotted key
    prefix that type errors name."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in d.items():
        name = "from_" if key == "from" else key
        if name not in fields:
            raise InputError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(k.rstrip('_') for k in fields))})")
        sub = {"init": InitSpec, "data": DataSpec, "optim": OptimSpec, "lora": LoraSpec}.get(name) if cls is Recipe else None
        if sub is not None:
            value = _build(sub, value or {}, f"{where}: {key}", f"{path}{key}.")
        elif name != "phases":  # phases: each is checked as a recipe of its own (phase_recipes)
            value = _typed(hints[name], value, _root(where), f"{path}{key}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None


# -- typed values ---------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}
_ADAPTERS: dict[Any, Any] = {}
_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
          dict: "a mapping"}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _root(where: str) -> str:
    """'recipe r.yaml: phase 2: optim' -> 'recipe r.yaml: phase 2' (type errors name the dotted key instead)."""
    for section in (": init", ": data", ": optim", ": lora"):
        if where.endswith(section):
            return where[: -len(section)]
    return where


def _describe(tp) -> str:
    """A field type in words: `int | None` -> 'an integer or null', `list[int]` -> 'a list of integers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and set(args) == {bool, type(None)}:
        return "true, false or null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        item = _describe(args[0]).removeprefix("an ").removeprefix("a ")
        n = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {n}{item}s"
    if origin is dict:
        return f"a mapping (each value {_describe(args[1])})"
    if tp is dict:
        return "a mapping"
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _leaves(tp) -> set:
    args = typing.get_args(tp)
    return {tp} if not args else set().union(*(_leaves(a) for a in args if a is not Ellipsis))


def _typed(tp, value: Any, where: str, key: str) -> Any:
    """`value` as the type `tp`, or a one-line InputError naming the key, the value and the expected type."""
    from pydantic import TypeAdapter, ValidationError

    def fail(detail: str = "") -> InputError:
        return InputError(f"{where}: {key}: expected {_describe(tp)}, got {value!r}{detail}")

    inner = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    if bool not in _leaves(tp) and any(isinstance(v, bool) for v in (value, *inner)):  # pydantic reads true as 1
        raise fail()
    if key.endswith("data.train") and isinstance(value, (list, tuple)):
        raise fail(" (one record file; to train on several, join them into one file or give each its own phase)")
    if tp not in _ADAPTERS:
        _ADAPTERS[tp] = TypeAdapter(tp)
    try:
        return _ADAPTERS[tp].validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        at = "".join(f"[{i}]" if isinstance(i, int) else f".{i}" for i in err["loc"])
        raise fail(f" ({at.lstrip('.')}: {err['input']!r})" if at else "") from None

