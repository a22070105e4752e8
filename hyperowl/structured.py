"""Structured outputs: a per-request grammar constraint (JSON schema or any JSON object) the engines apply.

Design note
-----------
The engines know token ids, never a tokenizer; a grammar needs the vocabulary's bytes. So the caller (the
pipeline's chat API, the server, `hyperowl batch`) makes a `Grammars` once per tokenizer (`grammars_for`:
the library's tokenizer info and compiler, cached) and from it one `Constraint` per request
(`Grammars.constraint(schema)`; a schema is compiled once, then served from a cache keyed by its canonical
JSON), and hands it to the engine in `Request.constraint`. Both engines (`Engine.stream`, `ContinuousEngine`)
go through the two functions here, so there is one place for it: `mask_logits` sets the logits of every
token the grammar forbids to -inf before `sample` (after the repetition penalty and the min_new_tokens
rule), `advance` feeds each row's chosen token to its constraint.

Ending: the request's stop tokens are the grammar's stop tokens (`override_stop_tokens`), so the mask
allows a stop only where the JSON is complete, and once it is complete nothing but a stop is allowed: the
answer ends when the grammar does. A constraint needs at least one stop token for that reason.

Library: xgrammar, chosen by measurement against llguidance (bench/bench_grammar_libs.py, docs/serving.md):
per-token masks of ~15-25 us on the embedded 1k vocabulary and ~0.8 ms on a 151k one, steady; llguidance's
mask time was erratic on this machine (28 ms medians). Whitespace is compact (`any_whitespace=False`) so a
weak model cannot fill its token budget with blanks.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

JSON_OBJECT = "json_object"  # the schema argument meaning "any JSON object" (OpenAI's response_format json_object)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # an optional extra
        raise ImportError("structured outputs need xgrammar: pip install 'hyperowl[structured]'") from e
    return xgrammar


class Constraint:
    """One request's grammar state: `allowed()` the bool mask [V] of the next token, `advance(token)`,
    `terminated`. Not thread-safe; one per request."""

    def __init__(self, compiled, vocab_size: int, stop_ids: Sequence[int]) -> None:
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.stop_ids = tuple(int(t) for t in stop_ids)
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(self.stop_ids))
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.failed = False  # a token the grammar refused was fed (cannot happen through the engines' mask)

    def apply(self, logits: Tensor) -> None:
        """Forbidden tokens of the next step to -inf, in place; logits [V] (any device)."""
        xgr = _xgr()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits[None], self._bitmask, vocab_size=self.vocab_size)
        else:  # one small copy of the packed mask (V/32 int32), then the kernel on the device
            xgr.apply_token_bitmask_inplace(logits[None], self._bitmask.to(logits.device, non_blocking=True),
                                            vocab_size=self.vocab_size)

    def allowed(self) -> Tensor:
        """Bool mask [V] of the tokens the grammar allows next (for tests and inspection)."""
        x = torch.zeros(self.vocab_size)
        self.apply(x)
        return torch.isfinite(x)

    def advance(self, token: int) -> None:
        if self.terminated:
            return
        if not self._matcher.accept_token(int(token)):
            self.failed = True
            log.warning("grammar refused token %d", token)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


class Grammars:
    """The grammar library's view of one tokenizer (`tokenizers.Tokenizer`) and a compile cache by schema."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        xgr = _xgr()
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        self.vocab_size = vocab_size
        with warnings.catch_warnings():  # "no stop tokens given": each request's matcher gets its own (overridden)
            warnings.simplefilter("ignore", UserWarning)
            self._info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self._info, cache_enabled=False)  # our cache below, keyed by schema
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the server compiles on its request threads
        self.compiles = 0

    def compile(self, schema: "dict | str") -> Any:
        """Compiled grammar for a JSON schema (dict) or JSON_OBJECT; ValueError for a schema it cannot take."""
        key = JSON_OBJECT if schema == JSON_OBJECT else json.dumps(schema, sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            if schema == JSON_OBJECT:
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            else:
                if not isinstance(schema, dict):
                    raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
                compiled = self._compiler.compile_json_schema(key, any_whitespace=False)
        except ValueError:
            raise
        except Exception as e:  # the library's own errors (unsupported keyword, bad schema)
            raise ValueError(f"JSON schema not supported: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from e
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, schema: "dict | str", stop_ids: Sequence[int]) -> Constraint:
        if not stop_ids:
            raise ValueError("a grammar constraint needs the model's stop tokens (none known for this tokenizer)")
        return Constraint(self.compile(schema), self.vocab_size, stop_ids)


_GRAMMARS: dict[tuple[int, int], Grammars] = {}
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer, vocab_size: int) -> Grammars:
    """The (cached) `Grammars` of a tokenizer object: its vocabulary is read once per process."""
    key = (id(tokenizer), vocab_size)
    with _GRAMMARS_LOCK:
        g = _GRAMMARS.get(key)
        if g is None:
            g = _GRAMMARS[key] = Grammars(tokenizer, vocab_size)
            g._owner = tokenizer  # keeps id(tokenizer) from being reused while cached
        return g


# -- the engines' side: one place for masking and advancing ------------------------------------------------------
def mask_logits(logits: Tensor, constraints: Sequence["Constraint | None"]) -> None:
    """Rows of logits [B, V] with a constraint get the grammar's mask (in place); None rows untouched. A row
    left with no token (the JSON is complete, only a stop fits, and min_new_tokens forbade stops) gets its
    stops back: the grammar's end wins over min_new_tokens (else every logit is -inf: NaN probabilities)."""
    rows = [r for r, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    for r in rows:
        constraints[r].apply(logits[r])
    dead = ~torch.isfinite(logits[rows]).any(-1)
    if bool(dead.any()):
        for r, d in zip(rows, dead.tolist()):
            if d:
                logits[r, list(constraints[r].stop_ids)] = 0.0


def advance(constraints: Sequence["Constraint | None"], tokens: Sequence[int]) -> None:
    for c, t in zip(constraints, tokens):
        if c is not None:
            c.advance(t)
