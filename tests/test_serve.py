"""The OpenAI-compatible server with the real `openai` client: sync, streaming, usage, stop strings, seeds,
the visual feature cache (images and videos), dynamic batching (`--batching dynamic`; the continuous scheduler
is tested in test_serve_continuous.py) with parallel streaming clients, queue
limits (429) and cancellation on disconnect. The model is the tiny random checkpoint (gibberish text), so we
assert structure, completeness and counts, and compare with the library's own answers."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402
from hyperowl.serve.app import StopText  # noqa: E402
from hyperowl.feature_cache import CachedMedia, FeatureCache  # noqa: E402

MODEL = "tiny-owl"


def png_bytes(color=(200, 30, 30), size=(60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_msg(text: str, *urls: str, kind: str = "image_url") -> list[dict]:
    parts = [{"type": kind, kind: {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    import hyperowl

    return hyperowl.load(chat_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    cfg = ServeConfig(model_name=MODEL, batching="dynamic", max_batch_size=8, batch_window_ms=30)
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=10).json()


def ask_together(ask, kws: list[dict]) -> list:
    """ask(kw) for every kw from its own thread, all released at once (so they can share a batch)."""
    start = threading.Barrier(len(kws))
    answers: list = [None] * len(kws)

    def run(i: int) -> None:
        start.wait(timeout=30)
        answers[i] = ask(kws[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return answers


# -- unit pieces -------------------------------------------------------------------------------------------

def test_feature_cache_is_a_byte_bounded_lru():
    import torch

    item = lambda: CachedMedia(torch.zeros(4, 4))  # noqa: E731  64 bytes each
    cache = FeatureCache(max_bytes=200)
    for k in "abc":
        cache.put(k, item())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", item())  # over budget: evicts the least recently used, b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.nbytes <= 200 and cache.evictions == 1
    cache.put("huge", CachedMedia(torch.zeros(100, 100)))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and len(cache) == 3


def test_stop_text_holds_back_a_possible_stop_prefix():
    class Fake:  # TextStream stand-in: token id -> text piece
        def __init__(self, pieces):
            self.pieces = pieces

        def push(self, t):
            return self.pieces[t]

    st = StopText(Fake(["Hello ", "wor", "ld", " E", "ND", "after"]), ["END"])
    out = [st.push(i) for i in range(5)]
    assert out == [("Hello ", False), ("wor", False), ("ld", False), (" ", False), ("", True)]
    st = StopText(Fake(["a E", "x"]), ["END"])
    assert st.push(0) == ("a ", False) and st.push(1) == ("Ex", False)  # "E" was not a stop after all


def test_prompt_keeps_pixels_per_item_and_never_decodes_a_cached_video(model, monkeypatch, tmp_path):
    """A request with a video and an image: the same ids, positions and pixels as the processor's own path.
    Asked again, the video's features come from the cache: it is probed for its frame count, but no frame
    is decoded and no tensor as large as its frames is ever built."""
    import hashlib

    import torch

    import hyperowl.processing.video as video_mod
    from hyperowl.serve.app import build_state
    from hyperowl.serve.media import MediaBlob
    from hyperowl.serve.prompt import VisualOptions, build_prompt
    from hyperowl.serve.protocol import parse_chat_request
    from tests.test_video import make_video

    state = build_state(model, None, ServeConfig(model_name=MODEL))
    pipe, proc, opts, frames = state.pipeline, model.processor, VisualOptions(cut=True, max_frames=16), 12
    s, png = proc.image_size, png_bytes(size=(90, 40))
    vbytes = make_video(tmp_path / "v.mp4", frames).read_bytes()
    video = MediaBlob("video", vbytes, hashlib.sha256(vbytes).hexdigest(), "messages[0].content[0]")
    image = MediaBlob("image", png, hashlib.sha256(png).hexdigest(), "messages[0].content[1]")
    req = parse_chat_request({"model": MODEL, "messages": image_msg("What?", "v", "i")}, MODEL, 100)
    req.messages[0].parts[0] = type(req.messages[0].parts[0])("video", "v", video.param)
    first = build_prompt(req, [video, image], pipe, opts)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    (tmp_path / "same.mp4").write_bytes(vbytes)
    ref = proc([{"role": "user", "content": "<|video|><|image|>What?"}], images=[img],
               videos=[str(tmp_path / "same.mp4")], max_frames=16, cut=True)
    assert torch.equal(first.input_ids, ref.input_ids) and torch.equal(first.image_positions, ref.image_positions)
    assert torch.equal(torch.cat([p.pixels for p in first.items]), ref.pixel_values)
    assert [p.hit for p in first.items] == [False, False] and first.image_tensors == ref.pixel_values.shape[0]
    pipe.encoder.finish([first.items])  # what the scheduler does: the features go into the cache

    def no_decode(*a, **k):
        raise AssertionError("a cached video was decoded")

    monkeypatch.setattr(video_mod, "iter_video", no_decode)
    largest = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: largest.append(real_cat(ts, *a, **k).numel()) or real_cat(ts, *a, **k))
    again = build_prompt(req, [video, image], pipe, opts)
    monkeypatch.undo()
    assert max(largest, default=0) < frames * 3 * s * s  # the frames were never concatenated
    assert again.items[0].hit and again.items[0].pixels is None and again.items[0].item.count == frames
    assert again.items[1].hit and again.cached_visual_tokens == again.visual_tokens
    assert torch.equal(again.input_ids, first.input_ids)


# -- API --------------------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL


def test_sync_completion_with_image_matches_library(server, client, model):
    img = png_bytes()
    r = client.chat.completions.create(model=MODEL, messages=image_msg("What colour?", data_url(img)), max_tokens=12)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    tpi = model.config.vision.tokens_per_image
    d = u.prompt_tokens_details.model_dump()
    assert d["image_tensors"] >= 1 and d["visual_tokens"] == d["image_tensors"] * tpi
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 12
    # Same prompt through the library (greedy): the server adds nothing of its own.
    ref = model.chat([{"role": "user", "content": "<|image|>What colour?"}], images=[img], max_new_tokens=12)
    assert choice.message.content == ref
    inputs = model.processor([{"role": "user", "content": "<|image|>What colour?"}], images=[img])
    assert u.prompt_tokens == inputs.input_ids.numel() and d["image_tensors"] == inputs.num_images


def test_streaming_ends_with_done_and_reports_usage(server, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"min_tokens": 10}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # Raw SSE: every event is `data: ...` and the stream ends with [DONE].
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_stream_text_equals_sync_text_and_seed_is_reproducible(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Describe this video."}], max_tokens=16,
              temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices)
    assert a == b == s


def test_stop_strings_cut_the_answer(client):
    base = dict(model=MODEL, max_tokens=24, temperature=1.0)
    for seed in range(20):  # find a seed whose gibberish has some text to cut (bounded search)
        full = client.chat.completions.create(messages=[{"role": "user", "content": "Compare the two pictures."}],
                                              seed=seed, **base).choices[0].message.content
        if len(full) >= 6:
            break
    else:
        pytest.skip("the random model produced no text for any seed")
    stop = full[3:5]
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Compare the two pictures."}], seed=seed,
                                       stop=[stop, "\x00never"], **base)
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=[{"role": "user", "content": "Compare the two pictures."}], seed=seed, stop=stop, stream=True, **base)
        if c.choices)
    assert streamed == full[: full.find(stop)]


def test_multi_turn_history_with_image(client):
    url = data_url(png_bytes((10, 200, 10)))
    msgs = image_msg("What is it?", url) + [{"role": "assistant", "content": "A square."},
                                            {"role": "user", "content": "And its colour?"}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."}] + msgs,
                                       max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens_details.image_tensors >= 1


def test_feature_cache_reuses_image_embeddings(server, client):
    url = data_url(png_bytes((1, 2, 3), size=(90, 30)))
    before = health(server)["feature_cache"]
    first = client.chat.completions.create(model=MODEL, messages=image_msg("What?", url), max_tokens=6)
    second = client.chat.completions.create(model=MODEL, messages=image_msg("And now?", url), max_tokens=6)
    d1, d2 = first.usage.prompt_tokens_details.model_dump(), second.usage.prompt_tokens_details.model_dump()
    assert d1["cached_visual_tokens"] == 0 and d2["cached_visual_tokens"] == d2["visual_tokens"] > 0
    after = health(server)["feature_cache"]
    assert after["hits"] > before["hits"] and after["entries"] == before["entries"] + 1
    # The cached embeddings give exactly the uncached answer.
    again = client.chat.completions.create(model=MODEL, messages=image_msg("What?", url), max_tokens=6)
    assert again.choices[0].message.content == first.choices[0].message.content


def test_video_part_and_cached_video_prompt(server, client, model, tmp_path):
    from test_video import make_video

    path = make_video(tmp_path / "clip.mp4", n_frames=12)
    url = data_url(path.read_bytes(), "video/mp4")
    msgs = image_msg("What happens?", url, kind="video_url")
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    d1, d2 = first.usage.prompt_tokens_details.model_dump(), second.usage.prompt_tokens_details.model_dump()
    assert d1["image_tensors"] == 12 and d1["visual_tokens"] == 12 * model.config.vision.tokens_per_image
    # The second request skipped decoding (stand-in frames) yet built the same prompt and answer.
    assert d2["cached_visual_tokens"] == d2["visual_tokens"] == d1["visual_tokens"]
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    ref = model.chat([{"role": "user", "content": "<|video|>What happens?"}], videos=[str(path)], max_new_tokens=6)
    assert first.choices[0].message.content == ref


def test_parallel_streaming_clients_all_complete_and_are_batched(server):
    n, max_tokens = 8, 12
    start = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        start.wait(timeout=30)
        chunks = list(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, temperature=0.8, seed=i, extra_body={"min_tokens": max_tokens}))
        results[i] = chunks

    before = health(server)["scheduler"]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(not t.is_alive() for t in threads)
    for chunks in results:
        assert chunks is not None, "a client got no answer"
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["length"] and chunks[-1].usage.completion_tokens == max_tokens
    after = health(server)["scheduler"]
    assert after["completed"] - before["completed"] == n
    assert after["batches"] - before["batches"] < n, "concurrent requests were never batched"
    assert after["largest_batch"] >= 2


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_disconnected_stream_is_cancelled(server):
    before = health(server)["scheduler"]["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 480,
            "min_tokens": 480, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events, then hang up
    assert got[0].startswith("data: ")
    assert _wait_for(lambda: health(server)["scheduler"]["cancelled"] > before), "the row was not cancelled"
    assert _wait_for(lambda: health(server)["scheduler"]["running"] == 0)


def test_full_queue_answers_429_with_retry_after(model):
    cfg = ServeConfig(model_name=MODEL, batching="dynamic", max_batch_size=1, max_queue=1, batch_window_ms=0)
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Long"}], "max_tokens": 480, "min_tokens": 480,
            "stream": True}
    with ServerThread(create_app(model, model.processor, cfg)) as srv, httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=long) as a:
            a_lines = a.iter_lines()  # keep the iterator: a collected one closes the response
            next(a_lines)
            assert _wait_for(lambda: health(srv)["scheduler"]["running"] == 1)
            with c.stream("POST", srv.url + "/v1/chat/completions", json=long) as b:  # waits in the queue
                b_lines = b.iter_lines()
                next(b_lines)
                assert health(srv)["scheduler"]["queued"] == 1
                r = c.post(srv.url + "/v1/chat/completions", json={**long, "stream": False})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
        # Both hung up: the running row is dropped, the queued one skipped, and the server serves again.
        assert _wait_for(lambda: health(srv)["scheduler"]["running"] == 0 and health(srv)["scheduler"]["queued"] == 0)
        ok = c.post(srv.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 3, "min_tokens": 0})
        assert ok.status_code == 200
        assert health(srv)["scheduler"]["cancelled"] == 2


def test_file_url_inside_allowed_dir(model, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "red.png").write_bytes(png_bytes())
    cfg = ServeConfig(model_name=MODEL, allowed_media_dir=media)
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=image_msg("What?", (media / "red.png").as_uri()), max_tokens=3)
        assert r.usage.prompt_tokens_details.image_tensors >= 1


def test_api_key(model):
    cfg = ServeConfig(model_name=MODEL, api_key="s3cret")
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_web_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "hyperowl" in r.text and "/web/app.js" in r.text
    assert httpx.get(server.url + "/web/app.js").status_code == 200
    assert httpx.get(server.url + "/web/..%2F__init__.py").status_code == 404


def test_serve_package_has_its_web_files():
    web = Path(__import__("hyperowl.serve.app", fromlist=["WEB_DIR"]).WEB_DIR)
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in web.iterdir()}


def test_concurrent_mixed_requests_equal_their_solo_answers(server, client):
    """Text-only and image requests batched together (padding, precomputed embeddings, per-row seeds) give
    the answers each gets alone."""
    urls = [data_url(png_bytes((30 * i, 90, 200), size=(50 + 20 * i, 40))) for i in range(3)]
    kws = [dict(messages=[{"role": "user", "content": "Hi" + "!" * i}], temperature=0.9, seed=i) for i in range(3)]
    kws += [dict(messages=image_msg("What is shown here?" * (i + 1), urls[i]), temperature=0.0) for i in range(3)]
    ask = lambda kw: client.chat.completions.create(model=MODEL, max_tokens=8, **kw).choices[0].message.content  # noqa: E731
    solo = [ask(kw) for kw in kws]
    before = health(server)["scheduler"]["batch_sizes"]
    assert ask_together(ask, kws) == solo
    after = health(server)["scheduler"]["batch_sizes"]
    assert any(int(k) >= 2 and v > before.get(k, 0) for k, v in after.items()), (before, after)


def test_padded_images_counts_the_slots_a_batch_pads():
    from hyperowl.serve.scheduler import padded_images

    assert padded_images([4, 1, 1, 0]) == 3 + 3 + 4
    assert padded_images([2, 2]) == 0 and padded_images([]) == 0


@pytest.mark.parametrize("max_padded", [2, 32])
def test_a_many_image_request_waits_rather_than_pad_single_image_ones(model, max_padded):
    """A request with 4 images and three single-image ones arrive together: with the default padding bound they
    are one batch of 4; with `max_padded_images` 2 (each single-image row would pad 3 slots) no batch holds all
    four (no cutting: one image, one slot). Every answer equals the request's solo answer."""
    cfg = ServeConfig(model_name=MODEL, batching="dynamic", max_batch_size=8, batch_window_ms=1500,
                      max_padded_images=max_padded, cut=False)
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        urls = [data_url(png_bytes((40 * i, 200 - 30 * i, 90), size=(40 + 10 * i, 40))) for i in range(4)]
        kws = [image_msg("Compare the images.", *urls)] + [image_msg(f"What is in picture {i}?", urls[i]) for i in range(3)]
        ask = lambda kw: client.chat.completions.create(model=MODEL, max_tokens=6, messages=kw,  # noqa: E731
                                                         temperature=0.0).choices[0].message.content
        solo = [ask(kw) for kw in kws]
        before = health(srv)["scheduler"]["batch_sizes"]
        together = ask_together(ask, kws)
        stats = health(srv)["scheduler"]
    assert together == solo
    new = {int(k): v - before.get(k, 0) for k, v in stats["batch_sizes"].items() if v > before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 4
    if max_padded == 32:
        assert new == {4: 1}
    else:  # no batch of all four, and a batch of one (the scheduler keeps the 4-image request apart; these counts
        # cannot tell which rows shared a batch)
        assert max(new) <= 3 and 1 in new and stats["deferred"] == 0


def test_engine_drops_a_cancelled_row_and_keeps_the_others(model):
    import torch

    from hyperowl.engine import Engine, Request, SamplingParams

    params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
    cancel = threading.Event()
    reqs = [Request(torch.tensor([5, 6, 7, 8]), params=params, cancel=cancel), Request(torch.tensor([9, 10]), params=params)]
    alone = Engine(model).generate([Request(torch.tensor([9, 10]), params=params)])[0]
    got: list[list[int]] = [[], []]
    for step, events in enumerate(Engine(model).stream(reqs)):
        for r, t in events:
            got[r].append(t)
        if step == 2:
            cancel.set()  # from "another thread": the row leaves at the next step
    assert len(got[0]) == 3 and got[1] == alone
