"""Structured decoding overhead: decode tokens/s of the same batch with and without a JSON schema, side by side
in one run, in both engines (padded `Engine`, paged `ContinuousEngine`), on the embedded model.

Free rows run to max_new_tokens (min_new_tokens = max_new_tokens, no early stop); constrained rows stop when
their JSON ends, so tokens/s (generated tokens / wall time, prefill included, median of --reps) is the fair
figure; the grammar's own time per token is reported too (mask + advance, from a timed wrapper).

    PYTHONPATH=$PWD python bench/bench_structured.py [--batch 8] [--max-new 64] [--out bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["cat", "dog", "bird", "circle", "square"]},
    "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    "count": {"type": "integer", "minimum": 0, "maximum": 999},
    "note": {"type": "string", "maxLength": 40}},
    "required": ["label", "colors", "count", "note"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args()
    import hyperowl
    import hyperowl.structured as st
    from hyperowl.batching import ContinuousEngine
    from hyperowl.engine import Engine, Request, SamplingParams

    torch.manual_seed(0)
    pipe = hyperowl.load(device="cpu")
    g = st.grammars_for(pipe.processor.tokenizer, pipe.model.config.vocab_size)
    t0 = time.perf_counter()
    g.compile(SCHEMA)
    compile_ms = (time.perf_counter() - t0) * 1e3
    texts = ["Describe the picture.", "What is this?", "Tag it.", "Who is there?"]
    ids = [pipe.processor.plan([{"role": "user", "content": texts[i % 4]}]).input_ids for i in range(args.batch)]

    grammar_s = [0.0]
    apply0, advance0 = st.Constraint.apply, st.Constraint.advance

    def timed(f):
        def w(*a):
            s = time.perf_counter()
            try:
                return f(*a)
            finally:
                grammar_s[0] += time.perf_counter() - s
        return w

    st.Constraint.apply, st.Constraint.advance = timed(apply0), timed(advance0)

    def reqs(constrained: bool):
        if constrained:
            p = SamplingParams(max_new_tokens=args.max_new, stop_token_ids=pipe.stop_ids)
            return [Request(x, params=p, constraint=g.constraint(SCHEMA, pipe.stop_ids)) for x in ids]
        p = SamplingParams(max_new_tokens=args.max_new, min_new_tokens=args.max_new, stop_token_ids=pipe.stop_ids)
        return [Request(x, params=p) for x in ids]

    def run_padded(rs):
        return sum(len(o) for o in Engine(pipe.model).generate(rs))

    def run_paged(rs):
        eng = ContinuousEngine(pipe.model, kv_cache_bytes=256 << 20)
        for i, r in enumerate(rs):
            eng.add(i, r)
        n = 0
        while eng.has_work():
            n += sum(e.token is not None for e in eng.step())
        return n

    results = {}
    for engine, run in (("Engine (padded)", run_padded), ("ContinuousEngine (paged)", run_paged)):
        for mode in ("free text", "JSON schema"):
            times, toks, gram = [], 0, []
            for _ in range(args.reps):
                rs = reqs(mode == "JSON schema")
                grammar_s[0] = 0.0
                s = time.perf_counter()
                toks = run(rs)
                times.append(time.perf_counter() - s)
                gram.append(grammar_s[0])
            wall = statistics.median(times)
            results[f"{engine} | {mode}"] = dict(tokens=toks, seconds=wall, tokens_per_s=toks / wall,
                                                 grammar_ms_per_token=statistics.median(gram) / toks * 1e3)
    st.Constraint.apply, st.Constraint.advance = apply0, advance0
    print(f"embedded model, batch {args.batch}, max_new_tokens {args.max_new}, CPU, schema compile {compile_ms:.1f} ms")
    print(f"{'engine | answers':40} {'tokens':>7} {'s':>7} {'tok/s':>8} {'grammar ms/tok':>15}")
    for k, r in results.items():
        print(f"{k:40} {r['tokens']:>7} {r['seconds']:>7.2f} {r['tokens_per_s']:>8.1f} {r['grammar_ms_per_token']:>15.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(batch=args.batch, max_new_tokens=args.max_new, compile_ms=compile_ms,
                                   device="cpu", results=results), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
