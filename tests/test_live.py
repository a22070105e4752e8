"""Live video sessions (hyperowl/live.py): frames appended to a kept cache, questions at any time.

The exactness contract is checked against the offline path (processor plan -> encoder -> one full
forward, and Pipeline.chat for the tokens), for both Owl3 variants."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OWL3_FIXTURE, make_tokenizer, random_owl3, skip_without
from hyperowl.errors import InputError
from hyperowl.pipeline import Pipeline
from hyperowl.processing.processor import Owl3Processor

VARIANTS = ["240728", "241101"]


def make_pipe(variant):
    if variant == "240728":  # the official-implementation fixture's weights
        if skip_without(OWL3_FIXTURE).args[0]:
            pytest.skip("owl3 fixture missing")
        from hyperowl.checkpoint import load_owl3

        model = load_owl3(OWL3_FIXTURE)
    else:
        model = random_owl3("241101")
    proc = Owl3Processor(make_tokenizer(), variant=variant, image_size=model.config.vision.image_size, cut=False)
    return Pipeline(model, proc)


@pytest.fixture(scope="module", params=VARIANTS)
def pipe(request):
    return make_pipe(request.param)


def frames(n, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def offline_logits(pipe, messages, videos=None, prompt=None, images=None):
    """Next-token logits of the offline prompt in one full forward (no cache), and its token ids."""
    if prompt is not None:  # a rendered prompt (timestamped sessions): tokenized as the processor does
        ids, pos = pipe.processor._tokenize(prompt)
        ids, pos = torch.tensor(ids), torch.tensor(pos)
        feats = pipe.encoder.encode_frames(pipe.processor.frame_pixels(images, len(images)))
    else:
        plan = pipe.processor.plan(messages, videos=videos)
        ids, pos, feats = plan.input_ids, plan.image_positions, pipe.encoder.encode(plan)
    kw = {} if feats is None else dict(image_embeds=feats, image_positions=pos[None])
    return pipe.model(ids[None], **kw).logits[0, -1].float(), ids.tolist()


def test_live_equals_offline_chat(pipe):
    """F1..F3, q1, F4..F5, q2 == the offline chat [user <|video|>q1, assistant a1, user <|video|>q2]."""
    f = frames(5)
    q1, q2 = "What colour is the circle?", "Describe this video."
    live = pipe.live(max_new_tokens=6, min_new_tokens=3)
    live.add_frames(f[:2])
    live.add_frames(f[2])  # a single frame, in a second call: the same turn
    a1 = live.ask(q1)
    ref1, ids1 = offline_logits(pipe, [{"role": "user", "content": "<|video|>" + q1}], videos=[f[:3]])
    assert live.ids[: len(ids1)] == ids1
    assert (live.last_logits - ref1).abs().max() <= 1e-4
    assert a1 == pipe.chat([{"role": "user", "content": "<|video|>" + q1}], videos=[f[:3]], max_new_tokens=6, min_new_tokens=3)

    live.add_frames(f[3:5])
    a2 = live.ask(q2)
    messages = [{"role": "user", "content": "<|video|>" + q1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": "<|video|>" + q2}]
    ref2, ids2 = offline_logits(pipe, messages, videos=[f[:3], f[3:5]])
    assert live.ids[: len(ids2)] == ids2
    assert (live.last_logits - ref2).abs().max() <= 1e-4
    assert a2 == pipe.chat(messages, videos=[f[:3], f[3:5]], max_new_tokens=6, min_new_tokens=3)
    # a text-only follow-up (no new frames) is a plain user turn
    a3 = live.ask("And now?")
    messages += [{"role": "assistant", "content": a2}, {"role": "user", "content": "And now?"}]
    ref3, ids3 = offline_logits(pipe, messages, videos=[f[:3], f[3:5]])
    assert live.ids[: len(ids3)] == ids3 and (live.last_logits - ref3).abs().max() <= 1e-4
    assert a3 == pipe.chat(messages, videos=[f[:3], f[3:5]], max_new_tokens=6, min_new_tokens=3)
    # every image's visual K/V written once: one append per add_frames batch and hyper layer, none at questions
    assert live.status()["frames_seen"] == 5
    live.close()


def test_visual_kv_never_recomputed(pipe):
    """Appending frames writes only the new frames' visual K/V; old slots keep their exact bytes."""
    live = pipe.live(max_new_tokens=2)
    live.add_frames(frames(2))
    live.ask("What colour is the circle?")
    layer = pipe.model.config.hyper_layers[0] - 1
    before = live.cache.visual(layer)[0].clone()
    assert before.shape[2] == 2 * pipe.model.config.vision.tokens_per_image
    writes = live.cache.visual_writes
    live.add_frames(frames(3, seed=1))
    live.flush()
    assert live.cache.visual_writes == writes + len(pipe.model.config.hyper_layers)
    assert torch.equal(live.cache.visual(layer)[0][:, :, : before.shape[2]], before)
    live.close()


def test_rolls_back_answer_tokens_the_text_tokenizes_differently(pipe):
    """Cached tokens that the full text tokenizes otherwise (here: a word fed character by character, as a
    model may generate it) are rolled back and re-prefilled, so the tokens equal the offline ones."""
    live = pipe.live(max_new_tokens=1)
    f = frames(2)
    live.add_frames(f)
    live.flush()
    word = "circle"
    chars = [pipe.processor.tokenizer.token_to_id(c) for c in word]
    assert None not in chars and len(pipe.processor._tokenize(word)[0]) < len(chars)
    with torch.no_grad():
        pipe.model(torch.tensor([chars]), cache=live.cache)
    live.ids += chars
    live._add_text(word)
    live.ask("What colour?")
    text = live.prompt()
    at_question = text[: text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
    ref, ids = offline_logits(pipe, None, prompt=at_question, images=f)
    assert live.ids[: len(ids)] == ids and (live.last_logits - ref).abs().max() <= 1e-4
    live.close()


def test_timestamps_in_the_prompt(pipe):
    f = frames(3)
    live = pipe.live(max_new_tokens=3)
    live.add_frames(f[:2], timestamps=[0.0, 1.0])
    live.add_frames(f[2:], timestamps=[2.5])
    live.ask("What happens?")
    text = live.prompt()
    assert "[0.0s]<|image|>[1.0s]<|image|>[2.5s]<|image|>" in text and text.endswith("<|endoftext|>")
    # the prompt text, tokenized as the processor does, with the frames' features: the same logits
    at_question = text[: text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
    ref, ids = offline_logits(pipe, None, prompt=at_question, images=f)
    assert live.ids[: len(ids)] == ids and (live.last_logits - ref).abs().max() <= 1e-4
    with pytest.raises(InputError, match="timestamps"):
        live.add_frames(f[0])  # the session is timestamped
    with pytest.raises(InputError, match="timestamps: 1 given for 2 frames"):
        live.add_frames(f[:2], timestamps=[3.0])
    # a stream's times increase: a repeat, a step back (also inside one call) or a non-time is refused whole
    for bad, msg in (([2.5], r"timestamps\[0\]: 2.5 s is not after the previous frame's 2.5 s"),
                     ([3.0, 3.0], r"timestamps\[1\]: 3 s is not after the previous frame's 3 s"),
                     ([float("nan")], r"timestamps\[0\]: nan is not a time")):
        with pytest.raises(InputError, match=msg):
            live.add_frames(f[: len(bad)], timestamps=bad)
    live.add_frames(f[0], timestamps=[3.0])  # the refused calls left nothing behind
    assert live.flush(60) and live.status()["frames_seen"] == 4
    assert live.prompt().endswith("[3.0s]<|image|>") and live.prompt().count("<|image|>") == 4
    live.close()


def test_question_before_any_frame_is_text_only(pipe):
    live = pipe.live(max_new_tokens=4)
    answer = live.ask("What colour is the circle?")
    assert answer == pipe.chat([{"role": "user", "content": "What colour is the circle?"}], max_new_tokens=4)
    live.close()


def test_frame_kinds_and_bad_frames(pipe):
    s = pipe.processor.image_size
    live = pipe.live(max_new_tokens=1)
    img = frames(1)[0]
    arr = np.asarray(img)
    px = pipe.processor.frame_pixels([img], 1)
    live.add_frames([img, arr, px[0]])
    live.add_frames(px)
    live.flush()
    feats = live.cache.visual(pipe.model.config.hyper_layers[0] - 1)[1]  # values: not rotated by MI-Rope
    t = pipe.model.config.vision.tokens_per_image
    assert feats.shape[2] == 4 * t
    for j in range(1, 4):  # the same picture as PIL, array, pixels [3,S,S] and [1,3,S,S]: the same visual V
        torch.testing.assert_close(feats[:, :, j * t : (j + 1) * t], feats[:, :, :t], rtol=0, atol=1e-5)
    # a frame of another size or mode (a stream that changes resolution, a grayscale camera): converted and
    # resized like every frame, so it equals its RGB version
    gray = img.convert("L").resize((64, 20))
    live.add_frames([gray, gray.convert("RGB"), img.convert("RGBA")])
    live.flush()
    feats = live.cache.visual(pipe.model.config.hyper_layers[0] - 1)[1]
    torch.testing.assert_close(feats[:, :, 4 * t : 5 * t], feats[:, :, 5 * t : 6 * t], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[:, :, 6 * t : 7 * t], feats[:, :, :t], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match=r"frames\[0\]: pixel values must be float \[3, %d, %d\]" % (s, s)):
        live.add_frames(torch.zeros(3, s + 1, s))
    with pytest.raises(InputError, match=r"frames\[1\]: an array must be HxWx3"):
        live.add_frames([img, np.zeros((4, 4), np.uint8)])
    with pytest.raises(InputError, match=r"frames\[0\]: expected a PIL image"):
        live.add_frames(["not a frame"])
    with pytest.raises(InputError, match="question: must not contain"):
        live.ask("<|image|>?")
    assert live.status()["frames_seen"] == 7  # nothing of the bad calls was queued
    live.close()


# -- follow: files, cameras, URLs ----------------------------------------------------------------------------------
def moving_frames(n, size=64):
    """A red square crossing a gray field, one step per frame."""
    out = []
    for k in range(n):
        im = Image.new("RGB", (size, size), (120, 120, 120))
        x = 4 + k * (size - 20) // max(1, n - 1)
        im.paste((220, 30, 30), (x, 20, x + 16, 36))
        out.append(im)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from hyperowl.data.synthetic.writer import write_mp4

    path = tmp_path_factory.mktemp("live") / "moving.mp4"
    write_mp4(moving_frames(12), path, fps=4)  # 3 s
    return path


def test_follow_file_takes_the_sampler_frames(pipe, clip):
    """Following a file at 2 fps, as fast as it decodes, gives the frames (and times) the offline sampler
    picks at fps=2, and the same answer as a session given those frames."""
    from hyperowl.processing.video import sample_frames_with_times

    live = pipe.live(max_new_tokens=3)
    handle = live.follow(clip, fps=2, realtime=False)
    assert handle.wait(60) and handle.ended and handle.error is None
    live.ask("Where is the square?")
    frames_ref, times = sample_frames_with_times(clip, max_frames=100, fps=2)
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5] and handle.frames == 6
    ref = pipe.live(max_new_tokens=3)
    ref.add_frames(frames_ref, timestamps=times)
    ref.ask("Where is the square?")
    assert live.prompt() == ref.prompt() and "[2.5s]<|image|>" in live.prompt()
    assert (live.last_logits - ref.last_logits).abs().max() <= 1e-4  # frames batched otherwise: float noise
    # a second source continues the session's clock
    again = live.follow(clip, fps=1, realtime=False)
    assert again.wait(60) and again.offset == 3.5 and live.flush(60)
    assert "[3.5s]<|image|>[4.5s]<|image|>[5.5s]<|image|>" in live.prompt()
    live.close()
    ref.close()


def test_follow_one_source_at_a_time(pipe, clip):
    """A second source while the first still runs is refused up front (a session has one clock: the two would
    interleave their times), and nothing of the first is disturbed; once it has ended, the next one is taken."""
    live = pipe.live(max_new_tokens=2)
    first = live.follow(clip, fps=2, realtime=True)  # plays at the clip's pace (~3 s)
    with pytest.raises(InputError, match=r"still follows '.*moving\.mp4'; a session takes one source at a time"):
        live.follow(clip, fps=2, realtime=False)
    assert first.wait(60) and first.ended and first.error is None and live.errors == []
    assert first.frames == 6 and live.flush(60)
    second = live.follow(clip, fps=1, realtime=False)
    assert second.wait(60) and second.ended and second.offset >= 3.0  # after the first's last frame (2.5 s)
    live.close()


def test_follow_bad_sources_are_clear_and_the_session_goes_on(pipe, clip, tmp_path):
    live = pipe.live(max_new_tokens=2)
    with pytest.raises(InputError, match="missing.mp4"):
        live.follow(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match=r"camera '/dev/video99': no such device"):
        live.follow("/dev/video99")
    with pytest.raises(InputError, match=r"url 'rtsp://127.0.0.1:9/none': cannot be opened"):
        live.follow("rtsp://127.0.0.1:9/none", stall_timeout=2)
    with pytest.raises(InputError, match="fps=0"):
        live.follow(clip, fps=0)
    assert live.ask("Anything?") is not None  # still answers (text-only: no frames yet)
    live.close()


def test_follow_stalled_url(pipe, tmp_path):
    """An http stream that stops sending: reported as stalled, the frames before it stay usable."""
    import socket
    import threading

    import av

    ts = tmp_path / "clip.ts"
    with av.open(str(ts), "w", format="mpegts") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width = st.height = 64
        st.pix_fmt = "yuv420p"
        for im in moving_frames(40):
            for p in st.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    data = ts.read_bytes()
    release = threading.Event()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():  # a real HTTP response: headers, the first 60% of the stream, then silence
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nContent-Length: %d\r\n\r\n" % len(data))
        conn.sendall(data[: len(data) * 6 // 10])
        release.wait(30)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/clip.ts"
    live = pipe.live(max_new_tokens=2)
    handle = live.follow(url, fps=1, realtime=False, stall_timeout=1.5)
    assert handle.wait(60)
    release.set()
    assert handle.error and "stalled" in handle.error and url in handle.error and handle.frames >= 2
    assert live.errors == [handle.error]
    live.ask("What moved?")
    assert live.status()["frames_seen"] == handle.frames
    live.close()
    srv.close()


# -- bounded memory ----------------------------------------------------------------------------------------------
def test_memory_ceiling_thins_old_frames_without_recomputing(pipe):
    cfg = pipe.model.config
    per_frame = len(cfg.hyper_layers) * 2 * cfg.num_kv_heads * cfg.vision.tokens_per_image * cfg.head_dim * 4
    f = frames(14, seed=3)
    probe = pipe.live(max_new_tokens=2)
    probe.add_frames(f[0])
    probe.flush()
    ceiling = probe.memory_bytes() + 5 * per_frame  # room for 6 frames
    live = pipe.live(max_new_tokens=2, memory_gb=ceiling / 2**30, recent_frames=3)
    layer, t = cfg.hyper_layers[0] - 1, cfg.vision.tokens_per_image
    written = {}  # each frame's visual K/V as appended (the note told after a thinning moves later positions)
    for k in range(14):
        live.add_frames(f[k], timestamps=[float(k)])
        live.flush()
        written[k] = live.cache.visual(layer)[0][:, :, -t:].clone()
        assert live.memory_bytes() <= ceiling
    st = live.status()
    assert st["frames_seen"] == 14 and st["frames_kept"] <= 6 and st["memory_bytes"] <= ceiling
    kept = [fr.index for fr in live.frames if fr.kept]
    assert kept[-3:] == [11, 12, 13] and kept[0] == 0  # the newest at full rate, the oldest still there, thinned
    # what is kept is moved, not recomputed: each kept frame's visual K/V equal those written when it came
    k_live = live.cache.visual(layer)[0]
    assert k_live.shape[2] == len(kept) * t
    for j, idx in enumerate(kept):
        assert torch.equal(k_live[:, :, j * t : (j + 1) * t], written[idx])
    # the model was told which times it still sees, right after the thinning (before the next question)
    note = live.visible_note()
    assert note.startswith("(Frames were dropped") and note.endswith(" 11.0s on.)") and "0.0s" in note
    live.ask("What is left?")
    assert live.memory_bytes() <= ceiling  # a question's text fits too
    end = "<|end_video_frame|>" if cfg.variant == "241101" else ""
    assert note + "\n" + end + "What is left?" in live.prompt()
    live.ask("And now?")  # told once
    assert live.prompt().count("(Frames were dropped") == 1
    for s in (live, probe):
        s.close()


def test_frames_are_encoded_off_the_callers_thread(pipe):
    import threading

    seen, sizes = [], []
    tower = pipe.encoder.encode_frames
    pipe.encoder.encode_frames = lambda px: seen.append(threading.current_thread()) or sizes.append(len(px)) \
        or tower(px)
    try:
        live = pipe.live(max_new_tokens=1, max_queued=8)
        f = frames(3)
        for k in range(40):  # far faster than the tower: the queue stays bounded, batches too
            live.add_frames(f[k % 3])
            assert live.status()["queued"] <= 8
        live.ask("?")
    finally:
        del pipe.encoder.encode_frames
    assert seen and all(t is not threading.main_thread() for t in seen)
    assert sum(sizes) == 40 and max(sizes) <= 16 and live.status()["frames_seen"] == 40
    live.close()


def test_many_single_frame_appends_stay_exact(pipe):
    """Frames one by one: the visual region regrows with spare slots (a gap before the text, which the 241101
    fused attention masks out); still the offline logits and tokens."""
    f = frames(14, seed=5)
    live = pipe.live(max_new_tokens=4, min_new_tokens=2)
    for im in f:
        live.add_frames(im)
        live.flush()
    layer = pipe.model.config.hyper_layers[0] - 1
    assert live.cache.vcap[layer] > live.cache.nv[layer]  # the case under test: spare slots before the text
    answer = live.ask("Describe this video.")
    messages = [{"role": "user", "content": "<|video|>Describe this video."}]
    ref, ids = offline_logits(pipe, messages, videos=[f])
    assert live.ids[: len(ids)] == ids and (live.last_logits - ref).abs().max() <= 1e-4
    assert answer == pipe.chat(messages, videos=[f], max_new_tokens=4, min_new_tokens=2)
    live.close()


def test_a_ceiling_below_the_text_is_reported_once(pipe, caplog):
    live = pipe.live(max_new_tokens=1, memory_gb=1e-6)  # ~1 KB: less than the text K/V alone
    with caplog.at_level("WARNING", logger="hyperowl.live"):
        for im in frames(4):
            live.add_frames(im)
            live.flush()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "cannot be held" in caplog.records[0].message and "raise memory_gb" in caplog.records[0].message
    assert live.ask("Still there?") is not None and live.status()["frames_kept"] >= 1
    live.close()
