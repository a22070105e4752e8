"""Structured outputs and logprobs at the engine level, on the embedded model (a real tokenizer): every
constrained answer parses and validates against its schema, in both engines, mixed in one batch with free-text
rows that stay identical to their solo answers; logprobs equal log_softmax of a full forward's logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from hyperowl.batching import ContinuousEngine  # noqa: E402
from hyperowl.engine import Engine, Request, SamplingParams  # noqa: E402
from hyperowl.structured import grammars_for  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"label": {"enum": ["cat", "dog", "bird"]}, "ok": {"type": "boolean"}},
     "required": ["label", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "x": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["n", "x"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "who": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                 "kind": {"enum": ["a", "b"]}},
                "required": ["name", "kind"], "additionalProperties": False},
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["id"], "additionalProperties": False}}},
     "required": ["who", "items"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def pipe():
    import hyperowl

    return hyperowl.load(device="cpu")


def prompt(pipe, text: str) -> torch.Tensor:
    return pipe.processor.plan([{"role": "user", "content": text}]).input_ids


def requests(pipe, constrained: bool, sampling: bool = False):
    g = grammars_for(pipe.processor.tokenizer, pipe.model.config.vocab_size)
    out = []
    for i, text in enumerate(["Describe the picture.", "What is this?", "Tag it.", "Who is there?"] * 2):
        kw = dict(temperature=0.8, seed=i) if sampling else {}
        p = SamplingParams(max_new_tokens=80, stop_token_ids=pipe.stop_ids, **kw)
        c = g.constraint(SCHEMAS[i % 4], pipe.stop_ids) if constrained and i % 2 == 0 else None
        out.append(Request(prompt(pipe, text), params=p, constraint=c))
    return out


def check_answers(pipe, reqs, outs, free_ref):
    from hyperowl.chat import detokenize

    for i, (r, o) in enumerate(zip(reqs, outs)):
        if r.constraint is None:
            assert o == free_ref[i], f"free row {i} changed by its constrained neighbours"
            continue
        assert o[-1] in pipe.stop_ids, f"row {i} did not end: {detokenize(pipe.processor.tokenizer, o)!r}"
        value = json.loads(detokenize(pipe.processor.tokenizer, o, pipe.stop_ids))
        jsonschema.validate(value, SCHEMAS[i % 4])


def continuous(pipe, reqs):
    eng = ContinuousEngine(pipe.model, kv_cache_bytes=64 << 20)
    for i, r in enumerate(reqs):
        eng.add(i, r)
    toks: dict[int, list[int]] = {}
    events = []
    while eng.has_work():
        for e in eng.step():
            events.append(e)
            toks.setdefault(e.request_id, []).append(e.token)
    return [toks[i] for i in range(len(reqs))], events


@pytest.mark.parametrize("sampling", [False, True])
def test_schemas_validate_mixed_with_free_rows_in_both_engines(pipe, sampling):
    free_ref = [Engine(pipe.model).generate([r])[0] for r in requests(pipe, False, sampling)]
    reqs = requests(pipe, True, sampling)
    check_answers(pipe, reqs, Engine(pipe.model).generate(reqs), free_ref)
    reqs = requests(pipe, True, sampling)  # fresh constraints (they hold the grammar state)
    check_answers(pipe, reqs, continuous(pipe, reqs)[0], free_ref)
    # without the constraint the embedded model's answers are not JSON: the grammar is what makes them so
    assert not all(o[:1] == [pipe.processor.tokenizer.token_to_id("{")] for o in free_ref)


def test_json_object_and_compile_cache(pipe):
    g = grammars_for(pipe.processor.tokenizer, pipe.model.config.vocab_size)
    n0 = g.compiles
    a = g.constraint({"type": "object", "properties": {"q": {"enum": [1, 2]}}, "required": ["q"]}, pipe.stop_ids)
    b = g.constraint({"required": ["q"], "properties": {"q": {"enum": [1, 2]}}, "type": "object"}, pipe.stop_ids)
    assert g.compiles == n0 + 1 and a is not b  # one compile (key order does not matter), one state per request
    c = g.constraint("json_object", pipe.stop_ids)
    allowed = c.allowed()
    assert allowed.sum() >= 1 and not any(bool(allowed[t]) for t in pipe.stop_ids)  # no stop before the JSON
    with pytest.raises(ValueError):
        g.constraint({"type": "object"}, ())


def full_forward_logprobs(pipe, ids: torch.Tensor, new: list[int]) -> torch.Tensor:
    seq = torch.cat([ids, torch.tensor(new[:-1], dtype=ids.dtype)])[None]
    with torch.no_grad():
        logits = pipe.model(input_ids=seq).logits[0].float()
    return torch.log_softmax(logits[ids.numel() - 1:], -1)


def test_logprobs_match_a_full_forward_in_both_engines(pipe):
    reqs = [Request(prompt(pipe, t), params=SamplingParams(max_new_tokens=12, stop_token_ids=pipe.stop_ids,
                                                         logprobs=k, **kw))
            for t, k, kw in [("Describe the picture.", 3, {}), ("What is this?", None, {}),
                             ("Tag it.", 0, dict(temperature=1.0, seed=3))]]
    got = {0: [], 1: [], 2: []}
    for step in Engine(pipe.model).stream(reqs):
        for e in step:
            got[e[0]].append((e[1], e.logprobs))
    cont_out, events = continuous(pipe, reqs)
    cont = {0: [], 1: [], 2: []}
    for e in events:
        cont[e.request_id].append((e.token, e.logprobs))
    for res in (got, cont):
        assert all(lp is None for _, lp in res[1])  # a row that did not ask gets none
        for i in (0, 2):
            toks = [t for t, _ in res[i]]
            ref = full_forward_logprobs(pipe, reqs[i].input_ids, toks)
            for j, (t, lp) in enumerate(res[i]):
                assert lp.token == t and abs(lp.logprob - float(ref[j, t])) <= 1e-4
                assert len(lp.top) == reqs[i].params.logprobs
                vals = [v for _, v in lp.top]
                assert vals == sorted(vals, reverse=True)
                for tid, v in lp.top:
                    assert abs(v - float(ref[j, tid])) <= 1e-4
                if i == 0:  # greedy: the chosen token is the most likely one
                    assert lp.top[0][0] == t


def test_batch_and_chat_api_take_a_json_schema(pipe, tmp_path):
    import subprocess
    import sys

    import hyperowl.batch

    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": t}]}
            for i, t in enumerate(["Describe the picture.", "What is this?", "Tag it."])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    schema = SCHEMAS[2]
    hyperowl.batch.run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", model=pipe, max_new_tokens=60, batch_size=2,
                       progress=False, json_schema=schema)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        jsonschema.validate(json.loads(row["answer"]), schema)
    # the Python API: chat and chat_batch (a per-conversation schema beside a free one)
    jsonschema.validate(json.loads(pipe.chat(recs[0]["messages"], json_schema=SCHEMAS[0], max_new_tokens=60)),
                        SCHEMAS[0])
    free, tagged = pipe.chat_batch([{"messages": recs[1]["messages"]},
                                    {"messages": recs[1]["messages"], "json_schema": SCHEMAS[1]}], max_new_tokens=60)
    assert free == pipe.chat(recs[1]["messages"], max_new_tokens=60)
    jsonschema.validate(json.loads(tagged), SCHEMAS[1])
    # the CLI: --json-schema FILE; a bad file is a one-line error naming it
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    r = subprocess.run([sys.executable, "-m", "hyperowl.cli", "batch", str(tmp_path / "in.jsonl"), "--out",
                        str(tmp_path / "o2.jsonl"), "--json-schema", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "--json-schema" in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_grammar_end_wins_over_min_new_tokens(pipe):
    g = grammars_for(pipe.processor.tokenizer, pipe.model.config.vocab_size)
    schema = SCHEMAS[0]
    # a stop that is not token 0 (an all -inf row's argmax would land on 0 and end the row by chance)
    stops = tuple(t for t in pipe.stop_ids if t != 0)
    p = SamplingParams(max_new_tokens=60, min_new_tokens=60, stop_token_ids=stops, temperature=0.7, seed=1)
    reqs = [Request(prompt(pipe, "Describe the picture."), params=p, constraint=g.constraint(schema, stops))]
    out = Engine(pipe.model).generate(reqs)[0]
    from hyperowl.chat import detokenize

    assert stops and out[-1] in stops and len(out) < 60
    jsonschema.validate(json.loads(detokenize(pipe.processor.tokenizer, out, stops)), schema)


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("family", ["241101", "owl2"])
def test_schemas_validate_on_the_other_families(pipe, family, sampling):
    """Owl3 241101 and Owl2 (tiny random models on the embedded tokenizer's vocabulary; every other row with an
    image) through both engines: every constrained answer validates, free rows equal their solo answers."""
    import dataclasses
    from types import SimpleNamespace

    from conftest import features, random_owl3
    from test_owl2 import random_owl2

    vocab = pipe.model.config.vocab_size
    model = random_owl3("241101", vocab_size=vocab) if family == "241101" else random_owl2(seed=3, vocab_size=vocab)
    fam = SimpleNamespace(model=model, processor=pipe.processor, stop_ids=pipe.stop_ids)
    size = model.config.vision.image_size
    feats = features(model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))

    def with_images(reqs):
        return [dataclasses.replace(r, input_ids=torch.cat([torch.tensor([7]), r.input_ids]), image_embeds=feats,
                                    image_positions=torch.tensor([0])) if i % 4 in (0, 1) else r
                for i, r in enumerate(reqs)]

    free_ref = [Engine(model).generate([r])[0] for r in with_images(requests(fam, False, sampling))]
    reqs = with_images(requests(fam, True, sampling))
    check_answers(fam, reqs, Engine(model).generate(reqs), free_ref)
    reqs = with_images(requests(fam, True, sampling))
    check_answers(fam, reqs, continuous(fam, reqs)[0], free_ref)
