"""The continuous scheduler (`hyperowl serve --batching continuous`, the default) against the real server and
the real `openai` client: a short request sent during a long answer finishes first (and not with dynamic
batching), greedy answers equal the dynamic scheduler's (text, image, video, concurrent), a request cancelled
mid-prefill frees its K/V blocks, a chat's follow-up turn reuses the previous turn's K/V (usage
cached_tokens), a request too large for the whole K/V budget is a 400, and a budget too small for the load
preempts requests without losing or changing any answer."""

from __future__ import annotations

import base64
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from conftest import png_data_url as png_url  # noqa: E402
from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402

MODEL = "tiny-owl"
TINY_KV_GB = 256 / 2**20  # 256 KiB: 64 blocks of 16 slots x one layer in the fixture model (4 layers, 2 x 16 K/V)


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    import torch

    import hyperowl

    # One torch thread, as `hyperowl serve` leaves a core to the event loop: torch's spinning workers on every
    # core starve the servers' event loops here (a 300-token stream took 10x longer with 2 threads on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield hyperowl.load(chat_checkpoint, device="cpu")
    torch.set_num_threads(threads)


def _server(model, **kw):
    return ServerThread(create_app(model, model.processor, ServeConfig(model_name=MODEL, **kw)))


@pytest.fixture(scope="module")
def cont(model):
    with _server(model, batching="continuous", kv_cache_gb=0.05) as srv:
        yield srv


@pytest.fixture(scope="module")
def dyn(model):
    with _server(model, batching="dynamic", max_batch_size=8, batch_window_ms=10) as srv:
        yield srv


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=10).json()["scheduler"]


def wait_for(pred, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def together(fn, args: list) -> list:
    """fn(a) for every a from its own thread, all released at once."""
    start = threading.Barrier(len(args))
    out: list = [None] * len(args)

    def run(i: int) -> None:
        start.wait(timeout=30)
        out[i] = fn(args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


@pytest.fixture
def slow_forward(model, monkeypatch):
    """Every model forward takes at least `delay[0]` seconds more (a long answer or prefill lasts long enough
    for a second client to act during it, on any machine)."""
    delay = [0.01]
    cls = type(model.model)
    forward = cls.forward

    def slow(self, *a, **k):
        time.sleep(delay[0])
        return forward(self, *a, **k)

    monkeypatch.setattr(cls, "forward", slow)
    return delay


# -- joining a running batch ------------------------------------------------------------------------------

@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_short_request_during_a_long_answer_finishes_first(model, batching, slow_forward):
    """The issue's repro: a 2-token request sent while a 300-token answer streams. Continuous batching answers
    it in about its own time; dynamic batching makes it wait for the whole batch (the check that this test
    fails there)."""
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}],
                 "max_tokens": 300, "min_tokens": 300, "stream": True}
    with _server(model, batching=batching, kv_cache_gb=0.05, batch_window_ms=10) as srv:
        done: dict[str, float] = {}
        started = threading.Event()

        def long_request() -> None:
            with httpx.Client(timeout=120) as c, c.stream("POST", srv.url + "/v1/chat/completions", json=long_body) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i == 3:  # the answer is streaming
                        started.set()
            done["long"] = time.monotonic()

        t = threading.Thread(target=long_request)
        t.start()
        assert started.wait(60)
        sent = time.monotonic()
        r = client(srv).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        done["short"] = time.monotonic()
        t.join(120)
    assert r.usage.completion_tokens <= 2
    short_first = done["short"] < done["long"]
    assert short_first == (batching == "continuous"), (batching, done["short"] - sent, done["long"] - sent)
    if batching == "continuous":  # about its own time: a few steps, not the long answer's remaining ~290
        assert done["short"] - sent < 0.5 * (done["long"] - sent)


# -- the same answers as the dynamic scheduler ------------------------------------------------------------

def test_greedy_answers_equal_the_dynamic_schedulers(cont, dyn, tmp_path):
    """Text, one image, two images and a video, greedy and seeded: each answer of the continuous server (all
    sent at once, so they share engine steps and join mid-decode) equals the dynamic server's solo answer."""
    from test_video import make_video

    video = "data:video/mp4;base64," + base64.b64encode(make_video(tmp_path / "v.mp4", n_frames=8).read_bytes()).decode()
    img = lambda c: {"type": "image_url", "image_url": {"url": png_url(c)}}  # noqa: E731
    contents = [
        "What colour is the circle?",
        [img((10, 200, 30)), {"type": "text", "text": "What is shown?"}],
        [img((200, 200, 30)), {"type": "text", "text": "Compare"}, img((0, 0, 250)), {"type": "text", "text": "this."}],
        [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What happens?"}],
        "A longer question about the picture and the movie, with many words in it, " * 3,
    ]
    bodies = [dict(model=MODEL, messages=[{"role": "user", "content": c}], max_tokens=6 + 5 * i)
              for i, c in enumerate(contents)]
    bodies.append(dict(bodies[1], temperature=0.9, seed=7, max_tokens=12))  # a seeded sampling row too
    def ask(srv):
        def one(b):
            r = client(srv).chat.completions.create(**b)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        return one

    ref = [ask(dyn)(b) for b in bodies]
    got = together(ask(cont), bodies)
    assert got == ref
    assert sum(n for _, _, n in ref) > 30


# -- the K/V cache ----------------------------------------------------------------------------------------

def test_a_request_cancelled_mid_prefill_frees_its_blocks(model, slow_forward):
    slow_forward[0] = 0.05
    words = "The red circle is left of the blue square and above the green one. " * 12  # ~310 tokens
    with _server(model, kv_cache_gb=0.05, prefill_chunk=8) as srv:
        base = health(srv)
        assert base["kv_cache"]["blocks_used"] == 0 and base["running"] == 0
        body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": 20, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200  # admitted (the headers come once the request is in the engine)
            assert wait_for(lambda: health(srv)["kv_cache"]["blocks_used"] > 0, 10), "never admitted"
            mid = health(srv)
        # the client has hung up during the prefill (~40 chunks of 8 tokens at >= 50 ms each)
        assert mid["running"] == 1 and mid["tokens"] == 0, mid
        assert wait_for(lambda: health(srv)["cancelled"] == 1, 10)
        after = health(srv)
    assert after["kv_cache"]["blocks_used"] == 0 and after["running"] == 0 and after["waiting"] == 0, after
    assert after["tokens"] == 0 and after["completed"] == 0


def test_a_follow_up_turn_reuses_the_previous_turns_kv(cont, dyn):
    """The second turn of a chat about two images: usage reports the reused prompt tokens and images, and the
    answer equals the dynamic server's (which prefills the whole history)."""
    first = [{"role": "system", "content": "You answer questions about pictures. " * 4},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((9, 99, 199))}},
                                          {"type": "image_url", "image_url": {"url": png_url((199, 9, 99))}},
                                          {"type": "text", "text": "What differs between the two pictures?"}]}]
    c = client(cont)
    r1 = c.chat.completions.create(model=MODEL, messages=first, max_tokens=12)
    d1 = r1.usage.prompt_tokens_details.model_dump()
    assert d1["cached_tokens"] == 0 and d1["cached_image_tensors"] == 0
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And which one is brighter?"}]
    r2 = c.chat.completions.create(model=MODEL, messages=second, max_tokens=12, stream=True,
                                   stream_options={"include_usage": True})
    chunks = list(r2)
    d2 = chunks[-1].usage.prompt_tokens_details.model_dump()
    assert d2["cached_tokens"] >= r1.usage.prompt_tokens - 16, (d2, r1.usage.prompt_tokens)  # all but a partial block
    assert d2["cached_image_tensors"] == d1["image_tensors"] > 2  # both images, each cut into crops + global view
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == client(dyn).chat.completions.create(model=MODEL, messages=second, max_tokens=12).choices[0].message.content
    assert health(cont)["prefix_cache"]["hit_rate"] > 0


@pytest.fixture(scope="module")
def tiny(model):
    with _server(model, kv_cache_gb=TINY_KV_GB) as srv:
        yield srv


def test_a_request_too_large_for_the_whole_budget_is_a_400(tiny):
    # ~90 prompt tokens + 300 fit the model's context (512) but not the budget (64 blocks x 16 slots / 4 layers)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there. " * 10}], "max_tokens": 300}
    for stream in (False, True):
        r = httpx.post(tiny.url + "/v1/chat/completions", json=dict(body, stream=stream), timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "kv_cache_exceeded" and err["param"] == "messages"
        # its size and the budget, in blocks and MB
        assert "needs" in err["message"] and "KV budget holds 64" in err["message"] and "max_new_tokens 300" in \
            err["message"], err["message"]
    assert health(tiny)["refused"] == 2 and health(tiny)["failed"] == 0
    ok = httpx.post(tiny.url + "/v1/chat/completions", json=dict(body, max_tokens=4), timeout=60)
    assert ok.status_code == 200


def test_a_budget_too_small_for_the_load_preempts_but_every_answer_is_whole_and_right(tiny, dyn):
    """Eight 60-token greedy answers at once in a budget that holds about three: requests wait or are preempted
    (recomputed), none is refused or fails, and each answer equals the dynamic server's."""
    bodies = [dict(model=MODEL, messages=[{"role": "user", "content": f"Question number {i}, please answer."}],
                   max_tokens=60, extra_body={"min_tokens": 60}) for i in range(8)]
    ask = lambda srv: lambda b: client(srv).chat.completions.create(**b)  # noqa: E731
    ref = [r.choices[0].message.content for r in together(ask(dyn), bodies)]
    before = health(tiny)
    got = together(ask(tiny), bodies)
    assert [r.usage.completion_tokens for r in got] == [60] * 8
    assert [r.choices[0].message.content for r in got] == ref
    after = health(tiny)
    assert after["preemptions"] > before["preemptions"], after
    assert after["failed"] == before["failed"] and after["completed"] - before["completed"] == 8
    assert after["kv_cache"]["blocks_used"] == 0


def test_health_reports_the_kv_cache_and_both_schedulers(cont, dyn):
    h = health(cont)
    assert h["batching"] == "continuous"
    kv = h["kv_cache"]
    assert kv["blocks_total"] == kv["blocks_used"] + kv["blocks_free"] > 0 and kv["kv_bytes"] > 0
    assert {"running", "waiting", "queued", "preemptions"} <= set(h) and "hit_rate" in h["prefix_cache"]
    assert health(dyn)["batching"] == "dynamic"


def test_the_tower_in_steps_gives_finishs_features(model, tmp_path):
    """Encoder.finish_steps (the continuous scheduler's tower, between engine steps): at most `chunk` image
    tensors per step, small items sharing a step and a large one split, and the same features as `finish`."""
    import torch

    from hyperowl.encoder import Encoder
    from hyperowl.feature_cache import FeatureCache
    from test_video import make_video

    video = str(make_video(tmp_path / "v.mp4", n_frames=7))
    images = [Image.new("RGB", (40 + 10 * i, 30), (60 * i, 90, 20)) for i in range(3)]
    plan = model.processor.plan([{"role": "user", "content": "<|image|><|video|><|image|><|image|>What?"}],
                                images=images, videos=[video], max_frames=7)
    fresh = lambda: Encoder(model.model, model.processor, FeatureCache(0))  # noqa: E731
    ref = fresh().finish([fresh().lookup(plan)])[0]
    enc = fresh()
    pend = enc.lookup(plan)
    counts = [p.item.count for p in pend]
    steps = list(enc.finish_steps(pend, chunk=3))
    assert sum(steps) == sum(counts) and max(steps) <= 3 and len(steps) < sum(counts)
    assert len(steps) > sum(counts) // 3  # the 7-frame video was split
    got = torch.cat([p.embeds for p in pend])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
