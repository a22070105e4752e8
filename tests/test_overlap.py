"""Decoding overlapped with the vision tower (processing/overlap.py, driven by the encoder): same embeddings as decode-then-encode,
a bounded number of chunks in flight, errors from either side raised in the caller, no thread left behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from hyperowl.encoder import Encoder
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.pipeline import Pipeline
from hyperowl.errors import InputError
from hyperowl.processing.overlap import chunked, encode_overlapped
from hyperowl.processing.processor import Owl3Processor
from tests.conftest import make_tokenizer, random_owl3
from tests.test_video import make_video


def test_chunked():
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []


@pytest.mark.parametrize("depth", [1, 2])
def test_encode_overlapped_equals_sequential_and_is_bounded(depth):
    produced = 0
    ahead = []

    def chunks():
        nonlocal produced
        for k in range(12):
            produced += 1
            yield torch.full((2, 3), float(k))

    consumed = 0

    def encode(x):
        nonlocal consumed
        consumed += 1
        time.sleep(0.02)  # a slow tower: an unbounded producer would run far ahead
        ahead.append(produced - consumed)
        return x * 2

    before = threading.active_count()
    out = encode_overlapped(chunks(), encode, depth=depth)
    assert torch.equal(out, torch.cat([torch.full((2, 3), 2.0 * k) for k in range(12)]))
    # depth chunks queued + one the producer holds while it waits to put it
    assert max(ahead) <= depth + 1
    assert max(ahead) >= 1  # it did run ahead: decoding overlapped the encoder
    assert threading.active_count() == before


def test_producer_error_reaches_caller():
    def chunks():
        yield torch.zeros(1)
        raise InputError("video 'x.mp4': broken")

    before = threading.active_count()
    with pytest.raises(InputError, match="x.mp4"):
        encode_overlapped(chunks(), lambda x: x)
    assert threading.active_count() == before


def test_encoder_error_stops_producer():
    closed = threading.Event()
    produced = 0

    def chunks():
        nonlocal produced
        try:
            for _ in range(1000):
                produced += 1
                yield torch.zeros(1)
        finally:
            closed.set()

    def encode(x):
        raise RuntimeError("tower failed")

    with pytest.raises(RuntimeError, match="tower failed"):
        encode_overlapped(chunks(), encode, depth=2)
    assert closed.is_set() and produced < 10  # the producer stopped and released its source


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("ov") / "v.mp4", 40)


@pytest.fixture(scope="module")
def model_and_processor():
    model = random_owl3()
    return model, Owl3Processor(make_tokenizer(), image_size=model.config.vision.image_size, cut=False)


def test_unthreaded_is_plain_chunked_encode():
    before = threading.active_count()
    out = encode_overlapped((torch.full((1,), float(k)) for k in range(5)), lambda x: x + 1, threaded=False)
    assert torch.equal(out, torch.arange(1.0, 6.0)) and threading.active_count() == before


@pytest.mark.parametrize("overlap", [True, False])
def test_encoder_matches_pixels(model_and_processor, video, overlap):
    """The encoder (video decoded and encoded 3 frames at a time, threaded or not) gives the features of
    decode-everything-then-encode, for the same plan."""
    model, proc = model_and_processor
    messages = [{"role": "user", "content": "<|image|>Compare with <|video|>"}]
    img = torch.rand(3, 50, 40).mul(255).byte().permute(1, 2, 0).numpy()
    from PIL import Image

    image = Image.fromarray(img)
    plain = proc(messages, images=[image], videos=[video], max_frames=11)
    plan = proc.plan(messages, images=[image], videos=[video], max_frames=11)
    with torch.no_grad():
        ref = model.encode_images(plain.pixel_values)
    fast = Encoder(model, proc, chunk=3, overlap=overlap).encode(plan)
    assert torch.equal(plan.input_ids, plain.input_ids) and torch.equal(plan.image_positions, plain.image_positions)
    assert fast.shape == ref.shape == (12, *ref.shape[1:])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_encoder_bad_video_is_input_error(model_and_processor, tmp_path):
    model, proc = model_and_processor
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(InputError, match="bad.mp4"):
        Encoder(model, proc).encode(proc.plan([{"role": "user", "content": "<|video|>?"}], videos=[bad]))
    with pytest.raises(ValueError, match="chunk"):
        Encoder(model, proc, chunk=0)


def test_chat_on_video_equals_pixel_path(model_and_processor, video):
    model, proc = model_and_processor
    messages = [{"role": "user", "content": "<|video|>Describe this video."}]
    answer = Pipeline(model, proc).chat(messages, videos=[video], max_frames=9, max_new_tokens=8)
    x = proc(messages, videos=[video], max_frames=9)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    with torch.no_grad():
        feats = model.encode_images(x.pixel_values)
    out = Engine(model).generate([Request(x.input_ids, image_embeds=feats, image_positions=x.image_positions,
                                          params=params)])[0]
    stops = {proc.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    kept = []
    for t in out:
        if t in stops:
            break
        kept.append(t)
    assert answer == proc.tokenizer.decode(kept, skip_special_tokens=True)


@pytest.mark.parametrize("threaded", [True, False])
def test_total_writes_each_output_into_one_tensor(threaded):
    """With `total`, an encoded chunk is copied into the result as it comes and can be freed right away:
    the embeddings exist once, not as a list of chunks plus their concatenation."""
    import gc
    import weakref

    outputs: list = []
    alive_when_encoding: list[int] = []

    def encode(x):
        gc.collect()
        alive_when_encoding.append(sum(r() is not None for r in outputs))
        y = x * 2
        outputs.append(weakref.ref(y))
        return y

    chunks = (torch.full((2, 3), float(k)) for k in range(5))
    out = encode_overlapped(chunks, encode, threaded=threaded, total=lambda: 10)
    assert torch.equal(out, torch.cat([torch.full((2, 3), 2.0 * k) for k in range(5)]))
    assert max(alive_when_encoding) == 0  # no earlier chunk's output is kept
    outputs.clear()
    alive_when_encoding.clear()
    encode_overlapped((torch.full((2, 3), float(k)) for k in range(5)), encode, threaded=threaded)
    assert alive_when_encoding[-1] == 4  # without total: all kept for the final cat (what total avoids)


@pytest.mark.parametrize("total", [3, 9])
def test_total_mismatch_is_an_error(total):
    with pytest.raises(ValueError, match="total"):
        encode_overlapped((torch.zeros(2, 1) for _ in range(3)), lambda x: x, total=total)


def test_total_single_chunk_is_returned_as_is():
    x = torch.arange(6.0).view(3, 2)
    assert encode_overlapped(iter([x]), lambda c: c, threaded=False, total=3) is x


def test_images_to_tensor_equals_stack_and_keeps_no_image():
    import gc
    import weakref

    from PIL import Image

    from hyperowl.processing.images import image_to_tensor, images_to_tensor

    refs = []
    gen = torch.Generator().manual_seed(0)

    def frames():
        for _ in range(4):
            gc.collect()
            # the consumer may still hold the frame before this one (its loop variable), never older ones
            assert sum(r() is not None for r in refs[:-1]) == 0
            im = Image.fromarray(torch.randint(0, 256, (30, 20, 3), dtype=torch.uint8, generator=gen).numpy())
            refs.append(weakref.ref(im))
            yield im
            del im

    out = images_to_tensor(frames(), 16, lambda: 4)
    gen.manual_seed(0)
    again = [Image.fromarray(torch.randint(0, 256, (30, 20, 3), dtype=torch.uint8, generator=gen).numpy())
             for _ in range(4)]
    assert torch.equal(out, torch.stack([image_to_tensor(im, 16) for im in again]))
    with pytest.raises(ValueError, match="count"):
        images_to_tensor(again, 16, 3)
    with pytest.raises(ValueError, match="count"):
        images_to_tensor(again, 16, 5)


def test_video_file_pixels_equal_sampled_frames(model_and_processor, video):
    """The processor resizes a video file's frames as they decode; the pixels equal sampling, then resizing."""
    from hyperowl.processing.images import image_to_tensor
    from hyperowl.processing.video import sample_frames

    _, proc = model_and_processor
    x = proc([{"role": "user", "content": "<|video|>What happens?"}], videos=[video], max_frames=7)
    ref = torch.stack([image_to_tensor(f, proc.image_size) for f in sample_frames(video, max_frames=7)])
    assert x.pixel_values.shape[0] == 7 and torch.equal(x.pixel_values, ref)


def test_video_pixels_tensor_equals_file(model_and_processor, video):
    """videos=[processor.video_pixels(path)] (a server decodes off its loop, then builds the prompt) gives the
    same prompt and pixels as the file itself; a tensor of the wrong shape is a clear InputError."""
    _, proc = model_and_processor
    messages = [{"role": "user", "content": "<|video|>What happens?"}]
    px = proc.video_pixels(video, max_frames=5)
    a, b = proc(messages, videos=[video], max_frames=5), proc(messages, videos=px, max_frames=5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert px.shape[0] == 5 and b.prompt.count("<|image|>") == 5
    with pytest.raises(InputError, match=r"videos\[0\].*video_pixels"):
        proc(messages, videos=[px[:, :, :8]])
