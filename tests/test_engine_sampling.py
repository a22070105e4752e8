"""The engine's sampling, on a scripted stand-in model whose logits are known (a function of each row's
tokens so far), and on `sample()` directly: greedy, temperature, top-k, top-p (the token that crosses the
threshold is kept), repetition penalty, min tokens, stops, per-request seeds.

Distributions are checked with a chi-square goodness-of-fit test against frequencies computed here from
the logits (plain math, not the engine's code): DRAWS draws per case from fixed seeds, so each test is
deterministic, and the bound is the statistic's 0.1% tail (a correct sampler fails 1 seed set in 1000; a
wrong distribution, e.g. the crossing token dropped (a 0.375 share becoming 0), is far outside it)."""

import math
from types import SimpleNamespace

import pytest
import torch

from hyperowl.engine import Engine, Request, SamplingParams, apply_repetition_penalty, sample, sampling_probs

DRAWS = 4000
ALPHA = 1e-3


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with `df` (integer) degrees of freedom (closed forms)."""
    h = x / 2
    if df % 2 == 0:
        return math.exp(-h) * sum(h**i / math.factorial(i) for i in range(df // 2))
    tail = sum(h ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (df + 1) // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * tail


def draws(logits: list[float], params: SamplingParams, n: int = DRAWS, seed0: int = 0) -> list[int]:
    """n tokens from one row's logits: n rows in one call, each with its own seeded generator."""
    x = torch.tensor([logits] * n, dtype=torch.float32)
    gens = [torch.Generator().manual_seed(seed0 + i) for i in range(n)]
    return sample(x, [params] * n, gens).tolist()


def assert_distribution(tokens: list[int], expected: list[float]) -> None:
    """Tokens with expected share 0 never appear; the rest fit `expected` (chi-square, p > ALPHA)."""
    n = len(tokens)
    counts = [tokens.count(v) for v in range(len(expected))]
    assert sum(counts) == n
    for v, p in enumerate(expected):
        if p == 0:
            assert counts[v] == 0, f"token {v} must never be drawn, got {counts[v]} of {n}"
    support = [v for v, p in enumerate(expected) if p > 0]
    stat = sum((counts[v] - n * expected[v]) ** 2 / (n * expected[v]) for v in support)
    if len(support) > 1:
        p = chi2_sf(stat, len(support) - 1)
        assert p > ALPHA, f"counts {counts} vs expected {[round(n * e, 1) for e in expected]}: chi2 {stat:.1f}, p {p:.2e}"


def normalized(ws: list[float]) -> list[float]:
    s = sum(ws)
    return [w / s for w in ws]


PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]


def test_chi2_sf_closed_forms():
    assert chi2_sf(0.0, 3) == pytest.approx(1.0)
    assert chi2_sf(10.828, 1) == pytest.approx(1e-3, rel=1e-3)   # the familiar table values
    assert chi2_sf(13.816, 2) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(16.266, 3) == pytest.approx(1e-3, rel=1e-3)


def test_greedy_is_the_argmax():
    x = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample(x, [SamplingParams(), SamplingParams()], [None, None]).tolist() == [1, 0]
    # a greedy row next to a sampling row keeps its argmax
    mixed = sample(x, [SamplingParams(), SamplingParams(temperature=1.0)], [None, torch.Generator().manual_seed(0)])
    assert mixed[0].item() == 1


def test_temperature_one_draws_the_softmax():
    assert_distribution(draws(LOGITS, SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_temperature_scales_the_logits(t):
    assert_distribution(draws(LOGITS, SamplingParams(temperature=t), seed0=10_000), normalized([p ** (1 / t) for p in PROBS]))


def test_top_k_keeps_the_k_most_likely():
    assert_distribution(draws(LOGITS, SamplingParams(temperature=1.0, top_k=2)), normalized(PROBS[:2] + [0, 0]))
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_k=1), n=200)) == {0}


@pytest.mark.parametrize("top_p, kept", [
    (0.7, 2),    # 0.5 < 0.7 <= 0.8: token 1 crosses the threshold and is kept
    (0.9, 3),    # 0.8 < 0.9 <= 0.95: token 2 crosses it
    (0.45, 1),   # the first token alone already reaches it
    (1.0, 4),    # off: every token
])
def test_top_p_keeps_the_token_that_crosses_the_threshold(top_p, kept):
    expected = normalized(PROBS[:kept] + [0] * (4 - kept))
    assert_distribution(draws(LOGITS, SamplingParams(temperature=1.0, top_p=top_p), seed0=20_000), expected)


def test_top_p_and_top_k_and_temperature_compose_in_order():
    """temperature first, then top-k, then top-p on the renormalized rest (the HF order): at T=2 the
    probabilities are sqrt-flattened; top_k=3 keeps three; top_p=0.6 then keeps the first two of those."""
    flat = normalized([p ** 0.5 for p in PROBS[:3]])
    assert flat[0] < 0.6 <= flat[0] + flat[1]
    got = draws(LOGITS, SamplingParams(temperature=2.0, top_k=3, top_p=0.6), seed0=30_000)
    assert_distribution(got, normalized(flat[:2] + [0, 0]))


def test_sampling_probs_exact():
    """The distribution itself, against hand-computed values: top-p 0.7 keeps tokens 0 and 1 (0.5/0.8,
    0.3/0.8); top-k 3 at temperature 2; vocabulary order kept."""
    x = torch.tensor([LOGITS[::-1]])  # token 3 is the likeliest here
    got = sampling_probs(x, [SamplingParams(temperature=1.0, top_p=0.7)])[0].tolist()
    assert got == pytest.approx([0, 0, 0.3 / 0.8, 0.5 / 0.8])
    got = sampling_probs(torch.tensor([LOGITS]), [SamplingParams(temperature=2.0, top_k=3)])[0].tolist()
    assert got == pytest.approx(normalized([p ** 0.5 for p in PROBS[:3]]) + [0], rel=1e-5)


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    """top_p=1 is off: with 150k tokens the float32 running sum passes 1 before the end, which must not drop
    the tail (it did: 23878 tokens could never be drawn)."""
    logits = torch.randn(1, 150_000, generator=torch.Generator().manual_seed(0)) * 3
    got = sampling_probs(logits, [SamplingParams(temperature=1.0, top_p=1.0)])
    assert bool((got > 0).all())
    assert torch.allclose(got, logits.softmax(-1), rtol=1e-4, atol=0)


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive divided, negative multiplied, unseen untouched


def test_per_request_seeds_are_reproducible_and_independent():
    p = SamplingParams(temperature=1.0)
    x = torch.tensor([LOGITS] * 3)
    one = lambda s: [sample(x[:1], [p], [g]).item() for g in [torch.Generator().manual_seed(s)] for _ in range(50)]
    assert one(7) == one(7) and one(7) != one(8)


# -- through the engine: a scripted model -------------------------------------------------------------------


class ScriptedCache:
    """Each live row's tokens so far (prompt + generated); `reorder` keeps rows as the engine drops them."""

    def __init__(self):
        self.rows: list[list[int]] = []

    def reorder(self, rows):
        self.rows = [self.rows[i] for i in rows.tolist()]


class ScriptedModel:
    """Next-token logits = `script(tokens so far)` per row: the sampler sees exactly what the test says."""

    def __init__(self, script, vocab: int = 8):
        self.script, self.device = script, torch.device("cpu")
        self.config = SimpleNamespace(vocab_size=vocab)
        self.calls = 0

    def new_cache(self, n):
        return ScriptedCache()

    def __call__(self, input_ids, attention_mask=None, image_embeds=None, image_positions=None, cache=None,
                 last_logits_only=False):
        self.calls += 1
        if attention_mask is not None:  # prefill: the real (unpadded) prompt of each row
            cache.rows = [[t for t, m in zip(r.tolist(), mk.tolist()) if m] for r, mk in zip(input_ids, attention_mask)]
        else:
            for row, t in zip(cache.rows, input_ids[:, 0].tolist()):
                row.append(t)
        logits = torch.stack([torch.tensor(self.script(row), dtype=torch.float32) for row in cache.rows])
        return SimpleNamespace(logits=logits[:, None, :])


def req(prompt, **params):
    return Request(torch.tensor(prompt), params=SamplingParams(**params))


def favourite(row):
    """Prefers token (last + 1) % 8 strongly, token 7 next."""
    out = [0.0] * 8
    out[(row[-1] + 1) % 8] = 5.0
    out[7] = max(out[7], 4.0)
    return out


def test_engine_greedy_stops_and_max_tokens_per_row():
    m = ScriptedModel(favourite)
    out = Engine(m).generate([req([1], max_new_tokens=10, stop_token_ids=(5,)),
                              req([0, 2, 3], max_new_tokens=2),
                              req([4], max_new_tokens=10, stop_token_ids=(6,))])
    assert out == [[2, 3, 4, 5], [4, 5], [5, 6]]  # each row follows its own history after others leave


def test_engine_min_new_tokens_forbids_stops_until_reached():
    m = ScriptedModel(lambda row: [0, 0, 0, 9.0, 1.0, 0, 0, 0])  # stop token 3 always most likely
    out = Engine(m).generate([req([1], max_new_tokens=6, stop_token_ids=(3,), min_new_tokens=3),
                              req([1], max_new_tokens=6, stop_token_ids=(3,))])
    assert out == [[4, 4, 4, 3], [3]]


def test_engine_repetition_penalty_over_prompt_and_generated():
    """HF's rule, once per step whatever the count: a seen token's positive logit is divided by the penalty.
    Logits 2.0, 1.9, 1.85 (tokens 0, 1, 2), penalty 1.1, token 0 in the prompt: 1 (0 is at 1.82), then 2 (1.85
    beats 1.82 and 1 at 1.73), then 0 for good (1.82 > 1.73, 1.68)."""
    base = [2.0, 1.9, 1.85, -5.0, -5.0, -5.0, -5.0, -5.0]
    m = ScriptedModel(lambda row: base)
    got = Engine(m).generate([req([0, 4], max_new_tokens=4, repetition_penalty=1.1)])[0]
    seen, expected = {0, 4}, []
    for _ in range(4):  # the HF rule by hand: divide the positive logits of seen tokens
        eff = [l / 1.1 if i in seen and l > 0 else (l * 1.1 if i in seen else l) for i, l in enumerate(base)]
        t = max(range(8), key=lambda i: eff[i])
        expected.append(t)
        seen.add(t)
    assert got == expected == [1, 2, 0, 0]
    assert Engine(m).generate([req([0, 4], max_new_tokens=4)])[0] == [0, 0, 0, 0]  # no penalty: always 0


def test_engine_sampling_distribution_and_seeds():
    """Sampled through the engine (prefill + one token per request): the first token's distribution is the
    temperature/top-p rule; a request's seed fixes its tokens whatever else is in the batch."""
    m = ScriptedModel(lambda row: LOGITS + [-1e9] * 4)
    reqs = [req([1], max_new_tokens=1, temperature=1.0, top_p=0.7, seed=i) for i in range(DRAWS)]
    first = [o[0] for o in Engine(m).generate(reqs)]
    assert_distribution(first + [], normalized(PROBS[:2] + [0] * 6))
    # seeds: the same request alone and amid others gives the same tokens
    mk = lambda s: req([2], max_new_tokens=6, temperature=1.0, seed=s)
    alone = Engine(m).generate([mk(11)])[0]
    crowd = Engine(m).generate([mk(3), mk(11), req([2], max_new_tokens=2)])
    assert crowd[1] == alone and Engine(m).generate([mk(11)])[0] == alone
    assert crowd[0] != alone  # another seed, another sequence (fixed seeds: checked once)
