"""The continuous engine over the paged KV cache (hyperowl/batching.py, hyperowl/paged_cache.py) against each
request's solo run: tokens equal and every step's logits within 1e-4 (fp32), for Owl3 240728, Owl3 241101 and
Owl2, in mixed batches (text only, 1 image, 16 images, a 32-frame video), with requests joining mid-decode,
chunked prefill, preemption, reused prefixes and sampling rows; plus the budget, abort and memory rules."""

import threading

import pytest
import torch

from conftest import features, random_owl3
from hyperowl.batching import ContinuousEngine
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.models.attention import BIG_POS
from hyperowl.paged_cache import PagedView, default_kv_cache_bytes

from test_owl2 import random_owl2

TOL = 1e-4
FAMILIES = ["240728", "241101", "owl2"]
IMAGE_ID = 7


def make_model(family):
    if family == "owl2":
        return random_owl2(seed=3, num_kv_heads=2)  # GQA
    return random_owl3(family)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return make_model(request.param)


def pixels(model, n, seed):
    size = model.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_request(model, length, starts, rng, max_new=6, hashes=None, **params):
    g = torch.Generator().manual_seed(rng)
    ids = torch.randint(10, 1000, (length,), generator=g)
    kw = {}
    if starts:
        ids[torch.tensor(starts)] = IMAGE_ID
        kw = dict(image_embeds=features(model, pixels(model, len(starts), rng)), image_positions=torch.tensor(starts))
    return Request(ids, params=SamplingParams(max_new_tokens=max_new, **params), media_hashes=hashes, **kw)


def mixed(model, seed=0):
    """Text only, 1 image, 16 images, a 32-frame video (consecutive placeholders)."""
    return [make_request(model, 19, [], seed + 1),
            make_request(model, 26, [4], seed + 2),
            make_request(model, 45, list(range(3, 35, 2)), seed + 3),
            make_request(model, 41, list(range(5, 37)), seed + 4)]


@torch.no_grad()
def solo(model, req):
    """The request alone: Engine.generate's tokens, and the logits of every step (prefill, then one token at a
    time through the KVCache, teacher-forced on those tokens)."""
    tokens = Engine(model).generate([req])[0]
    cache = model.new_cache(64)
    kw = {}
    if req.image_positions is not None:
        kw = dict(image_embeds=req.image_embeds, image_positions=req.image_positions[None])
    logits = [model(req.input_ids[None], cache=cache, last_logits_only=True, **kw).logits[0, -1].float()]
    for t in tokens[:-1]:
        logits.append(model(torch.tensor([[t]]), cache=cache).logits[0, -1].float())
    return tokens, torch.stack(logits)


def run(eng, joins=None, max_steps=10_000):
    """Step until done. joins: {step: [(id, request)]} added before that step. -> tokens, logits, steps to first
    token, per request id."""
    joins = dict(joins or {})
    toks, logits, first = {}, {}, {}
    step = 0
    while eng.has_work() or joins:
        for rid, r in joins.pop(step, []):
            eng.add(rid, r)
        for e in eng.step():
            if e.token is not None:
                toks.setdefault(e.request_id, []).append(e.token)
                first.setdefault(e.request_id, step)
                if e.logits is not None:
                    logits.setdefault(e.request_id, []).append(e.logits)
        step += 1
        assert step < max_steps
    return toks, {k: torch.stack(v) for k, v in logits.items()}, first


def assert_parity(model, reqs, toks, logits):
    for i, r in enumerate(reqs):
        ref_t, ref_l = solo(model, r)
        assert toks[i] == ref_t, f"request {i}"
        assert (logits[i] - ref_l).abs().max() <= TOL, f"request {i}: {(logits[i] - ref_l).abs().max()}"


def engine(model, **kw):
    kw.setdefault("kv_cache_bytes", 4 << 20)
    return ContinuousEngine(model, keep_logits=True, **kw)


# -- parity ------------------------------------------------------------------------------------------------
def test_images_change_the_outputs(model):
    """The fixtures can fail: each image request's solo logits differ from the same ids without the images."""
    for r in mixed(model)[1:]:
        _, with_images = solo(model, r)
        _, without = solo(model, Request(r.input_ids, params=r.params))
        assert (with_images[0] - without[0]).abs().max() > 1e-3


def test_mixed_batch_equals_solo_runs(model):
    reqs = mixed(model)
    eng = engine(model, prefill_chunk=48)
    toks, logits, _ = run(eng, {0: list(enumerate(reqs))})
    assert_parity(model, reqs, toks, logits)
    assert eng.stats()["blocks_used"] == 0


def test_requests_join_mid_decode(model):
    reqs = mixed(model, seed=10)
    reqs[0] = make_request(model, 12, [], 11, max_new=12)
    eng = engine(model)
    toks, logits, first = run(eng, {0: [(0, reqs[0])], 3: [(1, reqs[1])], 4: [(2, reqs[2]), (3, reqs[3])]})
    assert first[0] == 0 and first[1] >= 3 and len(toks[0]) > first[1]  # 1 joined while 0 was decoding
    assert_parity(model, reqs, toks, logits)


def test_chunked_prefill(model):
    """A chunk smaller than the prompts: prompts take several steps (images split across chunks), exact."""
    m = mixed(model, seed=20)
    reqs = [m[1], m[3]]
    eng = engine(model, prefill_chunk=9)
    toks, logits, first = run(eng, {0: list(enumerate(reqs))})
    assert first[0] >= 2 and first[1] >= 6
    assert_parity(model, reqs, toks, logits)


def test_preemption_when_the_budget_runs_out(model):
    reqs = [make_request(model, 30, [2, 9], 31, max_new=24), make_request(model, 28, [], 32, max_new=24),
            make_request(model, 33, [5], 33, max_new=24)]
    unit = 2 * model.config.num_kv_heads * 16 * model.config.head_dim * 4
    eng = engine(model, kv_cache_bytes=unit * 11 * model.config.num_layers, prefix_cache=False)
    toks, logits, _ = run(eng, {0: list(enumerate(reqs))})
    assert eng.stats()["preemptions"] > 0
    assert_parity(model, reqs, toks, logits)
    assert eng.stats()["blocks_used"] == 0


def test_sampling_rows_equal_their_solo_runs(model):
    reqs = [make_request(model, 20, [3], 41, max_new=10, temperature=0.9, top_k=50, seed=5),
            make_request(model, 15, [], 42, max_new=10, temperature=1.2, top_p=0.9, seed=6, repetition_penalty=1.3),
            make_request(model, 25, [1, 2], 43, max_new=10, repetition_penalty=1.5, min_new_tokens=4,
                         stop_token_ids=(3, 4))]
    eng = engine(model, prefill_chunk=16)
    toks, _, _ = run(eng, {0: [(0, reqs[0])], 2: [(1, reqs[1]), (2, reqs[2])]})
    for i, r in enumerate(reqs):
        assert toks[i] == Engine(model).generate([r])[0], f"request {i}"


# -- prefix reuse --------------------------------------------------------------------------------------------
def test_second_turn_reuses_the_first_turns_blocks(model):
    first = make_request(model, 40, [4, 5, 6], 51, max_new=20, hashes=("a", "b", "c"))
    eng = engine(model)
    toks, _, _ = run(eng, {0: [(0, first)]})
    follow = torch.randint(10, 1000, (9,), generator=torch.Generator().manual_seed(52))
    ids = torch.cat([first.input_ids, torch.tensor(toks[0]), follow])
    second = Request(ids, first.image_embeds, first.image_positions, SamplingParams(max_new_tokens=6),
                     media_hashes=("a", "b", "c"))
    toks2, logits2, _ = run(eng, {0: [(1, second)]})
    info = eng.request_info(1)
    # the first turn wrote 59 tokens (its last token is never fed): its 3 full blocks (Owl2: 4, its images' rows)
    # and the last, partly filled one (copied) are reused: all 59
    assert info["cached_tokens"] == 59 and info["cached_images"] == 3
    assert_parity(model, [second], {0: toks2[1]}, {0: logits2[1]})
    assert eng.stats()["prefix_hit_rate"] > 0


def test_a_continuation_diverging_inside_the_last_block_reuses_its_common_part(model):
    first = make_request(model, 40, [4, 5, 6], 81, max_new=20, hashes=("a", "b", "c"))
    eng = engine(model)
    toks, _, _ = run(eng, {0: [(0, first)]})
    other = (toks[0][15] + 1) % 990 + 10  # differs from the first turn's token 55 (slot 55, Owl2: 67: both partial)
    ids = torch.cat([first.input_ids, torch.tensor(toks[0][:15] + [other]), torch.arange(20, 28)])
    second = Request(ids, first.image_embeds, first.image_positions, SamplingParams(max_new_tokens=6),
                     media_hashes=("a", "b", "c"))
    toks2, logits2, _ = run(eng, {0: [(1, second)]})
    assert eng.request_info(1)["cached_tokens"] == 55
    assert_parity(model, [second], {0: toks2[1]}, {0: logits2[1]})


def test_a_last_block_holding_an_image_is_not_copied(model):
    first = make_request(model, 20, [18], 91, max_new=3, hashes=("z",))
    eng = engine(model)
    toks, _, _ = run(eng, {0: [(0, first)]})
    ids = torch.cat([first.input_ids, torch.tensor(toks[0]), torch.arange(30, 36)])
    second = Request(ids, first.image_embeds, first.image_positions, SamplingParams(max_new_tokens=6),
                     media_hashes=("z",))
    toks2, logits2, _ = run(eng, {0: [(1, second)]})
    assert eng.request_info(1)["cached_tokens"] == 16 and eng.request_info(1)["cached_images"] == 0
    assert_parity(model, [second], {0: toks2[1]}, {0: logits2[1]})


def test_same_video_asked_twice(model):
    video = list(range(2, 34))
    a = make_request(model, 60, video, 61, hashes=tuple(f"frame{i}" for i in video))
    eng = engine(model)
    run(eng, {0: [(0, a)]})
    q = torch.randint(10, 1000, (8,), generator=torch.Generator().manual_seed(62))
    b = Request(torch.cat([a.input_ids[:50], q]), a.image_embeds, a.image_positions, a.params,
                media_hashes=a.media_hashes)
    toks, logits, _ = run(eng, {0: [(1, b)]})
    assert eng.request_info(1)["cached_images"] == 32 and eng.request_info(1)["cached_tokens"] == 48
    assert_parity(model, [b], {0: toks[1]}, {0: logits[1]})


def test_images_without_hashes_or_with_other_hashes_are_not_reused(model):
    base = make_request(model, 40, [20], 71, hashes=("x",))
    eng = engine(model)
    run(eng, {0: [(0, base)]})
    other = make_request(model, 40, [20], 71, hashes=("x",))  # same ids ...
    other.image_embeds = features(model, pixels(model, 1, 72))  # ... another image
    unhashed = Request(base.input_ids, base.image_embeds, base.image_positions, base.params)
    for rid, r in ((1, dataclass_replace(other, media_hashes=("y",))), (2, unhashed)):
        toks, logits, _ = run(eng, {0: [(rid, r)]})
        assert eng.request_info(rid)["cached_tokens"] == 16 and eng.request_info(rid)["cached_images"] == 0
        assert_parity(model, [r], {0: toks[rid]}, {0: logits[rid]})
    # and the right hash reuses past the image
    toks, logits, _ = run(eng, {0: [(3, base)]})
    # Owl3: 2 full blocks + the first run's last, partly filled block up to the last token (always recomputed);
    # Owl2: 32 slots = 28 tokens (the first run's last block starts at slot 48, past this prompt's last full block)
    assert eng.request_info(3)["cached_tokens"] == (28 if is_owl2(model) else 39)
    assert eng.request_info(3)["cached_images"] == 1
    assert_parity(model, [base], {0: toks[3]}, {0: logits[3]})


def test_prefix_cache_under_a_small_budget_evicts_and_stays_exact():
    """Cached blocks are evicted (least recently released first) when new requests need room; a preempted
    request recomputes from its own cached blocks; a request whose prefix was evicted recomputes it. All exact."""
    model = make_model("241101")
    unit = 2 * model.config.num_kv_heads * 16 * model.config.head_dim * 4
    eng = engine(model, kv_cache_bytes=unit * 8 * model.config.num_layers)  # 32 pool blocks: 8 text blocks
    first = make_request(model, 40, [3, 4], 121, max_new=8, hashes=("p", "q"))
    toks, logits, _ = run(eng, {0: [(0, first)]})
    assert eng.stats()["blocks_cached"] > 0
    others = [make_request(model, 44, [], 122 + i, max_new=30) for i in range(2)]
    toks2, logits2, _ = run(eng, {0: [(1, others[0]), (2, others[1])]})
    st = eng.stats()
    assert st["preemptions"] > 0 and st["blocks_used"] == 0
    assert_parity(model, [first] + others, {0: toks[0], 1: toks2[1], 2: toks2[2]},
                  {0: logits[0], 1: logits2[1], 2: logits2[2]})
    again = make_request(model, 40, [3, 4], 121, max_new=8, hashes=("p", "q"))
    toks3, logits3, _ = run(eng, {0: [(3, again)]})
    assert eng.request_info(3)["cached_tokens"] < 32  # the first request's blocks were evicted meanwhile
    assert_parity(model, [again], {0: toks3[3]}, {0: logits3[3]})


def is_owl2(model):
    return type(model).__name__ == "Owl2Model"


def dataclass_replace(r, **kw):
    import dataclasses

    return dataclasses.replace(r, **kw)


# -- memory, budget, faults ----------------------------------------------------------------------------------
def test_abort_mid_prefill_frees_its_blocks(model):
    eng = engine(model, prefill_chunk=8)
    base = eng.stats()
    eng.add("long", make_request(model, 60, [10, 30], 81))
    eng.step()
    assert eng.stats()["blocks_used"] > 0 and eng.request_info("long")["kv_bytes"] > 0
    eng.abort("long")
    after = eng.stats()
    assert (after["blocks_used"], after["blocks_free"], after["running"]) == (base["blocks_used"], base["blocks_free"], 0)
    assert not eng.has_work()


def test_cancel_event_leaves_at_the_next_step(model):
    eng = engine(model)
    stop = threading.Event()
    r = make_request(model, 20, [], 82, max_new=50)
    r.cancel = stop
    eng.add(0, r)
    eng.step()
    stop.set()
    assert [(e.request_id, e.token, e.finish) for e in eng.step()] == [(0, None, "cancelled")]
    assert eng.stats()["blocks_used"] == 0 and not eng.has_work()


def test_a_request_larger_than_the_whole_budget_is_refused(model):
    eng = engine(model, kv_cache_bytes=1 << 16)
    with pytest.raises(ValueError, match=r"needs \d+ KV blocks \([\d.]+ MB\).*the KV budget holds \d+ \([\d.]+ MB\)"):
        eng.add(0, make_request(model, 200, [], 83))
    assert not eng.has_work()


def test_bad_requests_are_refused_before_they_join(model):
    eng = engine(model)
    r = make_request(model, 20, [3, 9], 84)
    for bad, match in ((dataclass_replace(r, image_positions=torch.tensor([9, 3])), "increasing"),
                       (dataclass_replace(r, image_positions=torch.tensor([3, 20])), "increasing"),
                       (dataclass_replace(r, media_hashes=("a",)), "1 media hashes for 2 images"),
                       (dataclass_replace(r, image_embeds=r.image_embeds[:1]), "1 image features for 2")):
        with pytest.raises(ValueError, match=match):
            eng.add(0, bad)
    eng.add(0, r)
    with pytest.raises(ValueError, match="already"):
        eng.add(0, r)
    assert eng.stats()["waiting"] == 1


def test_memory_per_request_is_its_own(model):
    """A text-only request's K/V bytes do not depend on a 16-image neighbour; images cost their own blocks."""
    text = make_request(model, 30, [], 91, max_new=3)
    many = make_request(model, 45, list(range(3, 35, 2)), 92, max_new=3)
    sizes = []
    for reqs in ([text], [text, many]):
        eng = engine(model, prefix_cache=False)
        for i, r in enumerate(reqs):
            eng.add(i, r)
        eng.step()
        sizes.append([eng.request_info(i)["kv_bytes"] for i in range(len(reqs))])
    assert sizes[0][0] == sizes[1][0] > 0
    assert sizes[1][1] > 2 * sizes[1][0]


def test_default_budget_is_a_share_of_free_memory():
    b = default_kv_cache_bytes("cpu")
    assert 64 << 20 <= b


def test_a_wrong_position_or_visibility_breaks_parity(monkeypatch):
    """The parity check has teeth: a view whose positions drift by one per forward, or that hides the images
    already written from later chunks and decode steps, differs."""
    model = make_model("240728")
    reqs = mixed(model)[1:3]
    refs = [solo(model, r) for r in reqs]
    real_init = PagedView.__init__

    for fault in ("position", "visibility"):
        def broken(self, manager, seqs, fault=fault, **kw):
            real_init(self, manager, seqs, **kw)
            if fault == "position":
                self.next_pos = self.next_pos + 1
            elif self.image_pos is not None:
                self.image_pos = torch.full_like(self.image_pos, BIG_POS)

        monkeypatch.setattr(PagedView, "__init__", broken)
        toks, logits, _ = run(engine(model, prefill_chunk=9), {0: list(enumerate(reqs))})
        assert any((logits[i] - refs[i][1]).abs().max() > 1e-3 for i in range(len(reqs))), fault


def test_decode_rows_of_very_different_sizes_are_split_exactly(monkeypatch):
    """A 32-frame video row does not pad three short rows' gathered K/V when another forward costs less (or the
    gather bound is passed): it decodes in its own forward; outputs unchanged."""
    import hyperowl.batching as batching

    model = make_model("241101")
    m = mixed(model, seed=100)
    reqs = [m[0], make_request(model, 12, [], 101), m[1], m[3]]
    eng = engine(model)
    for i, r in enumerate(reqs):
        eng.add(i, r)
    eng.step()  # every prompt prefilled: all four rows decode next
    rows = list(eng.running)
    ids = lambda groups: [[x.rid for x in g] for g in groups]  # noqa: E731
    monkeypatch.setitem(batching.FORWARD_OVERHEAD_BYTES, "cpu", 1 << 40)
    assert len(eng._decode_groups(rows)) == 1  # forwards dear (the tiny model's padding is cheap): one forward
    slot = eng.blocks.unit_bytes // 16
    eng.gather_bytes = 100 * slot  # the three short rows fit (< 100 slots each layer), the video (128) does not
    assert sorted(map(sorted, ids(eng._decode_groups(rows)))) == [[0, 1, 2], [3]]
    eng.gather_bytes = 1
    assert len(eng._decode_groups(rows)) == 4  # the gather bound holds whatever the cost
    monkeypatch.setitem(batching.FORWARD_OVERHEAD_BYTES, "cpu", 0)
    eng.gather_bytes, eng._weight_bytes = 256 << 20, 0
    assert ids(eng._decode_groups(rows))[-1] == [3]  # forwards free: the padding decides
    toks, logits, _ = run(engine(model, gather_bytes=1), {0: list(enumerate(reqs))})
    assert_parity(model, reqs, toks, logits)


def kept_kv_workload(model):
    """Rows of different sizes that leave at different steps (the text row first) while others join mid-decode."""
    return ([make_request(model, 19, [], 51, max_new=3), make_request(model, 26, [4], 52, max_new=14),
             make_request(model, 45, list(range(3, 35, 2)), 53, max_new=9),
             make_request(model, 41, list(range(5, 37)), 54, max_new=7)],
            {0: [(0, 0), (1, 1)], 3: [(2, 2)], 5: [(3, 3)]})


def test_kept_kv_follows_joins_leaves_and_preemption(model, monkeypatch):
    """Decode groups keep their gathered K/V across steps (paged_cache.KeptKV) and append each step's new K/V;
    a copy is rebuilt when a row joins that does not fit its layout or is preempted, and rows that leave are
    removed in place. Every request equals its solo run, and the copies were really reused, cut and rebuilt."""
    from hyperowl.paged_cache import KeptKV

    calls = {"start": 0, "remove": 0, "reused": 0}
    real_start, real_remove, real_init = KeptKV.start, KeptKV.remove, PagedView.__init__

    def start(self, view):
        calls["start"] += 1
        real_start(self, view)

    def remove(self, rows):
        calls["remove"] += bool(rows)
        return real_remove(self, rows)

    def init(self, manager, seqs, keep=None):
        calls["reused"] += keep is not None and keep.ready
        real_init(self, manager, seqs, keep=keep)

    monkeypatch.setattr(KeptKV, "start", start)
    monkeypatch.setattr(KeptKV, "remove", remove)
    monkeypatch.setattr(PagedView, "__init__", init)
    monkeypatch.setattr("hyperowl.batching.FORWARD_OVERHEAD_BYTES", {"cpu": 1 << 40})  # one decode group
    reqs, joins = kept_kv_workload(model)
    eng = engine(model)
    toks, logits, _ = run(eng, {k: [(i, reqs[j]) for i, j in v] for k, v in joins.items()})
    assert_parity(model, reqs, toks, logits)
    assert calls["reused"] > calls["start"] >= 3, calls
    assert eng._kept == [] and eng.stats()["blocks_used"] == 0

    # preemption: the newest row's blocks go and it comes back with a new PagedSeq; its old copy is never read
    reqs = [make_request(model, 30, [2, 9], 31, max_new=24), make_request(model, 28, [], 32, max_new=24),
            make_request(model, 33, [5], 33, max_new=24)]
    unit = 2 * model.config.num_kv_heads * 16 * model.config.head_dim * 4
    eng = engine(model, kv_cache_bytes=unit * 11 * model.config.num_layers, prefix_cache=False)
    calls.update(start=0, reused=0)
    toks, logits, _ = run(eng, {0: list(enumerate(reqs))})
    assert eng.stats()["preemptions"] > 0 and calls["reused"] > calls["start"]
    assert_parity(model, reqs, toks, logits)


def join_workload(model):
    """A long row decoding, shorter rows (text, images within the long group's) joining and leaving."""
    reqs = [make_request(model, 60, [], 181, max_new=16), make_request(model, 40, [3, 9], 182, max_new=5),
            make_request(model, 12, [], 183, max_new=6), make_request(model, 20, [4], 184, max_new=4),
            make_request(model, 9, [], 185, max_new=3)]
    return reqs, {0: [(0, reqs[0]), (1, reqs[1])], 2: [(2, reqs[2]), (3, reqs[3])], 4: [(4, reqs[4])]}


def test_rows_that_join_a_kept_copy_are_added_in_place(model, monkeypatch):
    """A row that joins a decode group whose copy has room for it (its text within the kept past, its images
    within the kept visual slots) is gathered into a spare row of the copy instead of a new copy; rows that
    leave are removed in place (the last row moves into the hole). Exact, and the copy was really grown."""
    from hyperowl.paged_cache import KeptKV

    calls = {"start": 0, "add": 0, "remove": 0}
    real_start, real_add, real_remove = KeptKV.start, KeptKV.add, KeptKV.remove

    def start(self, view):
        calls["start"] += 1
        real_start(self, view)

    def add(self, seqs):
        calls["add"] += len(seqs)
        real_add(self, seqs)

    def remove(self, rows):
        calls["remove"] += len(rows)
        real_remove(self, rows)

    monkeypatch.setattr(KeptKV, "start", start)
    monkeypatch.setattr(KeptKV, "add", add)
    monkeypatch.setattr(KeptKV, "remove", remove)
    monkeypatch.setattr("hyperowl.batching.FORWARD_OVERHEAD_BYTES", {"cpu": 1 << 40})  # one decode group
    reqs, joins = join_workload(model)
    eng = engine(model)
    toks, logits, _ = run(eng, joins)
    assert_parity(model, reqs, toks, logits)
    assert calls["add"] >= 2 and calls["remove"] >= 2 and calls["start"] <= 2
    assert eng._kept == [] and eng.stats()["blocks_used"] == 0


def test_kept_kv_budget_and_a_stale_copy_breaks_parity(monkeypatch):
    """keep_bytes bounds the kept copies (0: none kept, every step gathers; still exact), and the invalidation has
    teeth: a copy reused for rows by their place in the group instead of by identity and length (as if the
    invalidation were skipped when a row leaves: a row's K/V left in another row's place) gives other logits."""
    from hyperowl.paged_cache import KeptKV

    model = make_model("241101")
    monkeypatch.setattr("hyperowl.batching.FORWARD_OVERHEAD_BYTES", {"cpu": 1 << 40})  # one decode group
    reqs, joins = kept_kv_workload(model)
    joins = {k: [(i, reqs[j]) for i, j in v] for k, v in joins.items()}
    eng = engine(model, keep_bytes=0)
    starts = []
    real_start = KeptKV.start
    monkeypatch.setattr(KeptKV, "start", lambda self, view: starts.append(1) or real_start(self, view))
    toks, logits, _ = run(eng, joins)
    assert not starts and not eng._kept
    assert_parity(model, reqs, toks, logits)

    def stale_remove(self, rows):  # the bookkeeping moves the last row into the hole, its K/V stay behind
        for r in sorted(set(rows), reverse=True):
            last = len(self.seqs) - 1
            self.seqs[r], self.lengths[r], self.nimg[r] = self.seqs[last], self.lengths[last], self.nimg[last]
            for small in (self.valid, self.image_pos):
                if small is not None:
                    small[r] = small[last]
            self.seqs.pop(), self.lengths.pop(), self.nimg.pop()
        self.valid = self.valid[: len(self.seqs)]
        self.image_pos = None if self.image_pos is None else self.image_pos[: len(self.seqs)]

    monkeypatch.setattr(KeptKV, "remove", stale_remove)
    reqs, joins = join_workload(model)
    toks, stale, _ = run(engine(model), joins)
    refs = [solo(model, r)[1] for r in reqs]
    assert any(stale[i].shape != refs[i].shape or (stale[i] - refs[i]).abs().max() > 1e-3 for i in range(len(reqs)))


def test_bench_paged_step_smoke(tmp_path):
    """bench/bench_paged_step.py runs (tiny settings) and writes its JSON; the engines' outputs agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "paged_step.json"
    subprocess.run([sys.executable, str(root / "bench/bench_paged_step.py"), "--requests", "4", "--new", "2",
                    "--repeat", "1", "--threads", "1", "--out", str(out)], check=True, cwd=root, capture_output=True)
    got = json.loads(out.read_text())
    assert got["outputs_equal"] and got["paged"]["peak_kv_mb"] < got["padded"]["peak_kv_mb"]


# -- one prefill for requests that start alike (n > 1, a burst with one prompt) ---------------------------------
def same_prompt(model, k, seed=131):
    """k requests with one 45-token prompt holding 16 hashed images, each sampling with its own seed (n = k)."""
    base = make_request(model, 45, list(range(3, 35, 2)), seed, max_new=6,
                        hashes=tuple(f"img{i}" for i in range(16)))
    return [dataclass_replace(base, params=SamplingParams(max_new_tokens=6, temperature=1.0, seed=s))
            for s in range(k)]


@pytest.mark.parametrize("family", ["240728", "241101"])
def test_requests_with_one_prompt_share_one_prefill(family):
    """Four requests with one prompt added in one step: the first is prefilled, the other three wait for its
    blocks and reuse all of the prompt but the last token's block (44 // 16 whole blocks = 32 tokens). An
    unrelated request added behind them is admitted and answers in the first step. All equal their solo runs."""
    model = make_model(family)
    reqs = same_prompt(model, 4) + [make_request(model, 19, [], 132)]
    eng = engine(model)
    toks, logits, first = run(eng, {0: list(enumerate(reqs))})
    assert [eng.request_info(i)["cached_tokens"] for i in range(4)] == [0, 32, 32, 32]
    assert [eng.request_info(i)["cached_images"] for i in range(4)] == [0, 15, 15, 15]  # image 16 (at 33): block 2
    assert first[4] == 0 and first[0] == 0 and all(first[i] == 1 for i in range(1, 4))
    assert eng.stats()["prefill_tokens"] == 45 + 3 * 13 + 19
    assert_parity(model, reqs, toks, logits)
    assert len({tuple(toks[i]) for i in range(4)}) > 1  # the seeds differ: the fixture can tell rows apart


def test_followers_of_an_aborted_leader_finish_exactly():
    """The leader is aborted mid-prefill (chunked): one of its followers becomes the leader, the others reuse
    its blocks, every answer equals its solo run and nothing is left held."""
    model = make_model("241101")
    reqs = same_prompt(model, 3, seed=133)
    eng = engine(model, prefill_chunk=8)
    for i, r in enumerate(reqs):
        eng.add(i, r)
    eng.step()
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 2  # the followers wait
    eng.abort(0)
    toks, logits, _ = run(eng)
    assert sorted(eng.request_info(i)["cached_tokens"] for i in (1, 2)) == [0, 32]
    assert_parity(model, reqs[1:], {0: toks[1], 1: toks[2]}, {0: logits[1], 1: logits[2]})
    assert eng.stats()["blocks_used"] == 0 and not eng.has_work()


def test_a_burst_with_one_system_prompt_prefills_it_once():
    """Four requests whose first 40 tokens (4 hashed images among them) are shared and whose questions differ:
    the three followers wait one step for the shared blocks (2 whole blocks), then are admitted together
    (they do not wait for each other: none has blocks the others lack), and equal their solo runs."""
    model = make_model("241101")
    head = make_request(model, 40, [5, 6, 7, 8], 141, hashes=("s0", "s1", "s2", "s3"))
    reqs = []
    for i in range(4):
        tail = torch.randint(10, 1000, (9 + i,), generator=torch.Generator().manual_seed(142 + i))
        reqs.append(dataclass_replace(head, input_ids=torch.cat([head.input_ids, tail])))
    eng = engine(model)
    toks, logits, first = run(eng, {0: list(enumerate(reqs))})
    assert [eng.request_info(i)["cached_tokens"] for i in range(4)] == [0, 32, 32, 32]
    assert [first[i] for i in range(4)] == [0, 1, 1, 1]
    assert_parity(model, reqs, toks, logits)


def test_bench_n_smoke(tmp_path):
    """bench/bench_n.py runs (tiny settings) and writes its JSON: the modes' outputs agree, one prefill is shared."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "n.json"
    subprocess.run([sys.executable, str(root / "bench/bench_n.py"), "--n", "3", "--images", "2", "--text", "30",
                    "--new", "2", "--repeat", "1", "--threads", "1", "--out", str(out)], check=True, cwd=root,
                   capture_output=True)
    got = json.loads(out.read_text())
    shared, side = got["modes"]["n=3 shared"], got["modes"]["n=3 side by side"]
    assert got["outputs_equal"] and shared["cached_tokens"] == 2 * 16 and side["cached_tokens"] == 0
    assert shared["prefill_tokens"] == 32 + 2 * 16 and side["prefill_tokens"] == 3 * 32


# -- batched prefill: several requests' prompt chunks in one forward ---------------------------------------------
def record_prefill_forwards(monkeypatch):
    """Wrap ContinuousEngine._prefill_forward: per call, each row's (request id, chunk start, chunk end, images
    already written, images in the chunk)."""
    import bisect

    calls = []
    real = ContinuousEngine._prefill_forward

    def wrapped(self, group, events):
        calls.append([(x.rid, a, b, bisect.bisect_left(x.image_tok, a),
                       bisect.bisect_left(x.image_tok, b) - bisect.bisect_left(x.image_tok, a)) for x, a, b in group])
        return real(self, group, events)

    monkeypatch.setattr(ContinuousEngine, "_prefill_forward", wrapped)
    return calls


def test_batched_prefill_of_mixed_rows_equals_solo_runs(model, monkeypatch):
    """Forwards cost a lot (PREFILL_FORWARD_TOKENS huge): each step's chunks of text, 1-image, 16-image and video
    prompts run as one left-padded forward, with different chunk lengths, numbers of new images and (chunked)
    numbers of images already written per row (Owl3: the rows' image lists joined per row, `_packed`); plus a
    request joining mid-decode. Every request equals its solo run, and the batching really happened."""
    import hyperowl.batching as batching

    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 1 << 30)
    calls = record_prefill_forwards(monkeypatch)
    packed = []
    real_packed = PagedView._packed
    monkeypatch.setattr(PagedView, "_packed", lambda self, parts: packed.append(1) or real_packed(self, parts))
    reqs = mixed(model, seed=150) + [make_request(model, 23, [2, 20], 155, max_new=4)]
    eng = engine(model, prefill_chunk=40)
    toks, logits, _ = run(eng, {0: [(i, reqs[i]) for i in range(4)], 3: [(4, reqs[4])]})
    assert_parity(model, reqs, toks, logits)
    st = eng.stats()
    assert st["prefill_rows"] > st["prefill_forwards"] == len(calls)
    # one forward carried a text-only chunk beside chunks with images
    assert any(len(c) >= 2 and any(r[4] == 0 for r in c) and any(r[4] > 0 for r in c) for c in calls), calls
    # one forward carried rows with different numbers of images already written, some bringing new ones
    ragged = [c for c in calls if len({r[3] for r in c}) > 1 and any(r[4] for r in c)]
    assert ragged, calls
    if not is_owl2(model):
        assert packed  # the per-row join of old and new images ran


def test_prefill_groups_split_where_padding_costs_more(monkeypatch):
    """The grouping: with dear forwards all chunks share one; with free forwards the padding decides (a long chunk
    is not padded onto short ones); the gather bound always holds. Outputs exact either way."""
    import hyperowl.batching as batching

    model = make_model("241101")
    reqs = [make_request(model, 12, [], 161), make_request(model, 14, [3], 162), make_request(model, 120, [], 163),
            make_request(model, 15, [], 164)]
    eng = engine(model)
    for i, r in enumerate(reqs):
        eng.add(i, r)
    eng._admit()
    chunks = [(x, 0, len(x.tokens)) for x in eng.running]
    rid = lambda groups: sorted(sorted(x.rid for x, _, _ in g) for g in groups)  # noqa: E731
    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 1 << 30)
    assert rid(eng._prefill_groups(chunks)) == [[0, 1, 2, 3]]
    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 8)
    assert rid(eng._prefill_groups(chunks)) == [[0, 1, 3], [2]]
    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 1 << 30)
    eng.gather_bytes = 1
    assert len(eng._prefill_groups(chunks)) == 4
    for x in list(eng.running):
        eng.abort(x.rid)
    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 8)
    eng = engine(model)
    toks, logits, _ = run(eng, {0: list(enumerate(reqs))})
    assert_parity(model, reqs, toks, logits)
    assert eng.stats()["prefill_forwards"] == 2


def test_a_padded_prefill_that_writes_padding_breaks_parity(monkeypatch):
    """The batched prefill's parity has teeth: a view that writes a padded row's first columns (padding) into its
    blocks instead of its real slots gives other logits (the forward itself reads the right copy; later steps
    read the blocks)."""
    import hyperowl.batching as batching

    model = make_model("240728")
    monkeypatch.setitem(batching.PREFILL_FORWARD_TOKENS, "cpu", 1 << 30)
    reqs = [make_request(model, 12, [], 171), make_request(model, 30, [4], 172)]
    refs = [solo(model, r)[1] for r in reqs]
    real_begin = PagedView.begin

    def begin(self, new_valid):
        real_begin(self, new_valid)
        if self._src is not None:  # each row's first n columns instead of its n real (last) ones
            lq = new_valid.shape[1]
            self._src = torch.tensor([r * lq + j for r, n in enumerate(self._counts) for j in range(n)])

    monkeypatch.setattr(PagedView, "begin", begin)
    toks, logits, _ = run(engine(model), {0: list(enumerate(reqs))})
    assert any(logits[i].shape != refs[i].shape or (logits[i] - refs[i]).abs().max() > 1e-3 for i in range(2))
