"""Choose the grammar library for structured outputs by measurement: xgrammar vs llguidance.

For each library: import time, tokenizer set-up, compile time of a few JSON schemas (and json_object), and the
per-token mask time while walking a valid answer token by token (mask for the step, then advance with the
answer's token), on the embedded model's tokenizer (1024 ids) and on a synthetic byte-level vocabulary of
Qwen2's size (151,646 ids; built offline, no hub). Prints a table, writes JSON.

    PYTHONPATH=$PWD python bench/bench_grammar_libs.py [--out bench/results/grammar_libs.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMAS = {
    "enum+number": ({"type": "object", "properties": {"label": {"enum": ["cat", "dog", "bird"]},
                                                      "confidence": {"type": "number"}},
                     "required": ["label", "confidence"], "additionalProperties": False},
                    {"label": "dog", "confidence": 0.75}),
    "array": ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                                "count": {"type": "integer"}},
               "required": ["tags", "count"], "additionalProperties": False},
              {"tags": ["red", "round", "small"], "count": 3}),
    "nested": ({"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                   "required": ["name", "age"], "additionalProperties": False},
        "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                              "ok": {"type": "boolean"}},
                                             "required": ["id", "ok"], "additionalProperties": False}}},
        "required": ["person", "items"], "additionalProperties": False},
        {"person": {"name": "Ada", "age": 36}, "items": [{"id": 1, "ok": True}, {"id": 2, "ok": False}]}),
    "json_object": (None, {"a": [1, 2, {"b": "c"}], "d": None}),
}


def synthetic_qwen_sized(n: int = 151_646):
    """A byte-level BPE tokenizer with n ids: the 256 byte symbols, then random word pieces (with and without the
    leading-space symbol) and JSON-ish punctuation runs. Only its vocabulary matters to a grammar library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    punct = ['"', ':', ',', '{', '}', '[', ']', 'Ġ', '."', '",', '":', 'Ġ"', '_', '-']
    while len(vocab) < n - 3:
        k = rng.randint(2, 9)
        s = "".join(rng.choice(letters) for _ in range(k))
        r = rng.random()
        s = ("Ġ" + s) if r < 0.4 else (rng.choice(punct) + s) if r < 0.55 else (s + rng.choice(punct)) if r < 0.7 else s
        vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def hf_wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def bench_xgrammar(tok, vocab_size, stop, cases, reps):
    t0 = time.perf_counter()
    import xgrammar as xgr
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_wrap(tok), vocab_size=vocab_size, stop_token_ids=[stop])
    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    t_setup = time.perf_counter() - t0
    out = {}
    for name, (schema, ids) in cases.items():
        t0 = time.perf_counter()
        cg = comp.compile_builtin_json_grammar() if schema is None else comp.compile_json_schema(json.dumps(schema))
        t_compile = time.perf_counter() - t0
        mask = xgr.allocate_token_bitmask(1, vocab_size)
        logits = torch.zeros(1, vocab_size)
        times = []
        for _ in range(reps):
            m = xgr.GrammarMatcher(cg)
            for t in ids + [stop]:
                s = time.perf_counter()
                m.fill_next_token_bitmask(mask)
                xgr.apply_token_bitmask_inplace(logits, mask)
                times.append(time.perf_counter() - s)
                assert m.accept_token(t), (name, t)
            assert m.is_terminated()
        out[name] = dict(compile_ms=t_compile * 1e3, mask_us_median=statistics.median(times) * 1e6,
                         mask_us_p90=sorted(times)[int(0.9 * len(times))] * 1e6, tokens=len(ids) + 1)
    return dict(import_s=t_import, setup_s=t_setup, cases=out)


def bench_llguidance(tok, vocab_size, stop, cases, reps):
    t0 = time.perf_counter()
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf_wrap(tok), n_vocab=vocab_size, eos_token=stop)
    t_setup = time.perf_counter() - t0
    out = {}
    for name, (schema, ids) in cases.items():
        t0 = time.perf_counter()
        grm = llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
        m = llguidance.LLMatcher(lltok, grm)
        t_compile = time.perf_counter() - t0
        assert not m.is_error(), m.get_error()
        mask = lt.allocate_token_bitmask(1, vocab_size)
        logits = torch.zeros(1, vocab_size)
        times = []
        for _ in range(reps):
            m = llguidance.LLMatcher(lltok, grm)
            for t in ids + [stop]:
                s = time.perf_counter()
                lt.fill_next_token_bitmask(m, mask, 0)
                lt.apply_token_bitmask_inplace(logits, mask)
                times.append(time.perf_counter() - s)
                assert m.consume_token(t), (name, t, m.get_error())
            assert m.is_stopped()
        out[name] = dict(compile_ms=t_compile * 1e3, mask_us_median=statistics.median(times) * 1e6,
                         mask_us_p90=sorted(times)[int(0.9 * len(times))] * 1e6, tokens=len(ids) + 1)
    return dict(import_s=t_import, setup_s=t_setup, cases=out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/grammar_libs.json")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from hyperowl.processing.processor import load_tokenizer

    toks = {"embedded (1024)": (load_tokenizer(ROOT / "hyperowl/assets/owl3-synthetic"), 1024),
            "synthetic 151,646": (synthetic_qwen_sized(), 151_646)}
    results = {}
    for vname, (tok, vsize) in toks.items():
        stop = tok.token_to_id("<|im_end|>")
        cases = {k: (s, tok.encode(json.dumps(v)).ids) for k, (s, v) in SCHEMAS.items()}
        for lib, fn in [("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)]:
            results[f"{lib} | {vname}"] = fn(tok, vsize, stop, cases, args.reps)
    print(f"{'library | vocab':34} {'setup s':>8} " + " ".join(f"{k[:11]:>24}" for k in SCHEMAS))
    print(f"{'':34} {'':>8} " + " ".join(f"{'compile ms / mask us':>24}" for _ in SCHEMAS))
    for key, r in results.items():
        cells = " ".join(f"{c['compile_ms']:>11.1f} / {c['mask_us_median']:>9.1f}" for c in r["cases"].values())
        print(f"{key:34} {r['setup_s']:>8.2f} {cells}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
