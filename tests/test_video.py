"""Tests for PyAV frame sampling on small generated videos whose frames encode their own index."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models

from hyperowl.errors import InputError
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.video import (VideoSample, iter_video, sample_frames, sample_frames_with_times, sample_video,
                                      video_targets)

W, H = 64, 48


def _codec() -> str:
    from hyperowl.data.synthetic import video_codec  # the encoder choice the synthetic videos use too

    try:
        return video_codec()
    except RuntimeError:
        pytest.skip("no H.264 or MPEG-4 encoder in this PyAV build")


def _frame_for(k: int) -> np.ndarray:
    """Frame k shows the 16 bits of k as black/white blocks (2 rows x 8 columns of 8x24 pixels)."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(16):
        if (k >> b) & 1:
            r, c = divmod(b, 8)
            a[r * 24 : (r + 1) * 24, c * 8 : (c + 1) * 8] = 255
    return a


def frame_index(img: Image.Image) -> int:
    a = np.asarray(img.convert("L")).astype(int)
    k = 0
    for b in range(16):
        r, c = divmod(b, 8)
        if a[r * 24 + 12, c * 8 + 4] > 127:  # sample block centres, away from coding artefacts
            k |= 1 << b
    return k


def make_video(path: Path, n_frames: int, fps: int = 10, gop: int = 10, fmt: str | None = None,
               force_keyframes: frozenset[int] = frozenset()) -> Path:
    """Frame k shows k; a keyframe every `gop` frames (no scene-cut keyframes), plus at `force_keyframes`."""
    codec = _codec()
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.gop_size = gop
    if codec == "libx264":
        stream.options = {"crf": "12", "preset": "ultrafast", "keyint_min": str(gop), "sc_threshold": "0"}
    for k in range(n_frames):
        frame = av.VideoFrame.from_ndarray(_frame_for(k), format="rgb24")
        if k in force_keyframes:
            frame.pict_type = av.video.frame.PictureType.I
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 10 s at 10 fps: frame k at k/10 s.
    return make_video(tmp_path_factory.mktemp("v") / "short.mp4", 100)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 60 s at 10 fps with a keyframe every second.
    return make_video(tmp_path_factory.mktemp("v") / "long.mp4", 600, gop=10)


def test_frames_encode_their_index() -> None:
    assert all(frame_index(Image.fromarray(_frame_for(k))) == k for k in (0, 1, 77, 599, 1234))


def test_uniform_sampling(short_video: Path) -> None:
    frames, times = sample_frames_with_times(short_video, max_frames=16)
    expected = [int((i + 0.5) * 100 / 16) for i in range(16)]  # frame displayed at each segment centre
    assert [frame_index(f) for f in frames] == expected
    assert times == pytest.approx([k / 10 for k in expected])
    assert all(f.mode == "RGB" and f.size == (W, H) for f in frames)
    assert [frame_index(f) for f in sample_frames(short_video, max_frames=1)] == [50]


def test_uniform_with_fewer_frames_than_requested(tmp_path: Path) -> None:
    path = make_video(tmp_path / "tiny.mp4", 7)
    frames = sample_frames(path, max_frames=16)
    assert [frame_index(f) for f in frames] == list(range(7))


def test_fps_sampling(short_video: Path) -> None:
    frames = sample_frames(short_video, fps=1)
    assert [frame_index(f) for f in frames] == list(range(0, 100, 10))
    frames = sample_frames(short_video, fps=2.5, max_frames=32)
    assert [frame_index(f) for f in frames] == [4 * k for k in range(25)]
    # 10 one-second targets capped to 4 by uniform subsampling (segment centres): targets 1, 3, 6, 8 s.
    frames = sample_frames(short_video, fps=1, max_frames=4)
    assert [frame_index(f) for f in frames] == [10, 30, 60, 80]


def test_video_targets() -> None:
    assert video_targets(10.0, 100, 4, None) == pytest.approx([1.25, 3.75, 6.25, 8.75])
    assert video_targets(10.0, 2, 4, None) == pytest.approx([2.5, 7.5])
    assert video_targets(2.0, 20, 16, 2.0) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert video_targets(0.0, 0, 16, None) == [0.0]


def test_seeking_decodes_fewer_frames(long_video: Path) -> None:
    seek = sample_video(long_video, max_frames=4, seek="exact")
    full = sample_video(long_video, max_frames=4, seek_threshold=math.inf)  # never seeks: auto is exact
    expected = [75, 225, 375, 525]
    assert [frame_index(f) for f in seek.frames] == expected
    assert [frame_index(f) for f in full.frames] == expected
    assert seek.seeks > 0 and full.seeks == 0
    assert seek.seek_mode == full.seek_mode == "exact"
    assert full.frames_decoded > 500
    assert seek.frames_decoded < full.frames_decoded / 5
    # Denser targets still come out right when mixing seeks and forward decoding.
    dense = sample_video(long_video, max_frames=24, keyframes=False)  # the old spelling of seek="exact"
    assert dense.seek_mode == "exact"
    assert [frame_index(f) for f in dense.frames] == [int((i + 0.5) * 600 / 24) for i in range(24)]
    assert dense.frames_decoded < 600


@pytest.mark.parametrize("how", [{"keyframes": True}, {"seek": "keyframe"}])
def test_keyframe_mode_keeps_the_keyframe_it_lands_on(long_video: Path, how: dict) -> None:
    # keyframes every 10 frames (1 s): targets 75, 225, 375, 525 snap to the keyframes 70, 220, 370, 520
    snap = sample_video(long_video, max_frames=4, **how)
    assert [frame_index(f) for f in snap.frames] == [70, 220, 370, 520]
    assert snap.frames_decoded == 4 and snap.seeks == 4 and snap.seek_mode == "keyframe"
    # targets closer than the seek threshold are still decoded forward to the exact frame
    dense = sample_video(long_video, max_frames=600, **how)
    assert [frame_index(f) for f in dense.frames] == list(range(600))


SPARSE_FPS, SPARSE_GOP = 25, 50  # a keyframe every 2 s


@pytest.fixture(scope="module")
def sparse_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 s at 25 fps with a keyframe every 50 frames: exact seeking decodes ~25 frames per kept frame.
    return make_video(tmp_path_factory.mktemp("v") / "sparse.mp4", 400, fps=SPARSE_FPS, gop=SPARSE_GOP)


def _pixels(s) -> list[bytes]:
    return [np.asarray(f).tobytes() for f in s.frames]


def test_auto_takes_the_nearest_keyframe_when_targets_are_far_apart(sparse_video: Path, tmp_path: Path) -> None:
    # 5 targets 3.2 s apart (>= 1.5 keyframe intervals of 2 s): frames 40, 120, 200, 280, 360.
    auto = sample_video(sparse_video, max_frames=5)
    exact = sample_video(sparse_video, max_frames=5, seek="exact")
    assert auto.seek_requested == "auto" and auto.seek_mode == "keyframe" and exact.seek_mode == "exact"
    assert auto.keyframe_interval == pytest.approx(SPARSE_GOP / SPARSE_FPS)
    assert auto.probe_packets == 0  # MP4: measured from the container's index, nothing demuxed
    targets = [round(t * SPARSE_FPS) for t in auto.targets]
    assert [frame_index(f) for f in exact.frames] == targets == [40, 120, 200, 280, 360]
    picked = [frame_index(f) for f in auto.frames]
    assert picked == [50, 100, 200, 300, 350]  # the keyframe nearest each target
    assert all(k % SPARSE_GOP == 0 and abs(k - t) <= SPARSE_GOP // 2 for k, t in zip(picked, targets))
    assert auto.times == pytest.approx([k / SPARSE_FPS for k in picked])
    assert auto.frames_decoded <= 2 * len(auto.frames) and auto.packets_decoded <= 2 * len(auto.frames)
    assert auto.decoded_per_kept <= 2 < 10 < exact.decoded_per_kept
    assert auto.keyframe_fallbacks == 0
    # Matroska has no per-sample index at open: the interval comes from demuxing six keyframes' worth of packets.
    mkv = make_video(tmp_path / "sparse.mkv", 400, fps=SPARSE_FPS, gop=SPARSE_GOP, fmt="matroska")
    auto_mkv = sample_video(mkv, max_frames=5)
    assert auto_mkv.seek_mode == "keyframe" and auto_mkv.keyframe_interval == pytest.approx(SPARSE_GOP / SPARSE_FPS)
    assert 5 * SPARSE_GOP < auto_mkv.probe_packets <= 5 * SPARSE_GOP + 1
    assert [frame_index(f) for f in auto_mkv.frames] == picked and auto_mkv.frames_decoded <= 2 * len(picked)
    # The same through the processor's streaming entry point, with fps targets (every 4 s from 0).
    st = VideoSample(frames=[], times=[])
    got = [(round(t * SPARSE_FPS), frame_index(im)) for t, im in iter_video(sparse_video, fps=0.25, stats=st)]
    assert got == [(0, 0), (100, 100), (200, 200), (300, 300)] and st.seek_mode == "keyframe"
    assert st.frames_decoded <= 2 * len(got)


def test_auto_is_exact_for_short_gaps_and_dense_keyframes(sparse_video: Path, tmp_path: Path) -> None:
    cases = [
        (sparse_video, 6, True),  # 2.7 s apart: under 1.5 keyframe intervals, measured -> exact
        (sparse_video, 16, False),  # 1 s apart: under the seek threshold, nothing to measure
        (make_video(tmp_path / "intra.mp4", 200, gop=1), 4, True),  # every frame a keyframe: exact costs 1
    ]
    for path, n, probed in cases:
        auto = sample_video(path, max_frames=n)
        exact = sample_video(path, max_frames=n, seek="exact")
        assert auto.seek_mode == "exact", (path, n)
        assert (auto.keyframe_interval is not None) == probed, (path, n)
        assert auto.times == exact.times and _pixels(auto) == _pixels(exact)  # bit for bit
        assert auto.frames_decoded == exact.frames_decoded


def test_auto_decodes_exactly_where_a_keyframe_is_too_far(tmp_path: Path) -> None:
    # Keyframes every 2 s for the first 12 s (what the probe sees), then none until the end (16 s).
    path = make_video(tmp_path / "irregular.mp4", 400, fps=25, gop=1000, force_keyframes=frozenset(range(0, 300, 50)))
    auto = sample_video(path, max_frames=5)
    exact = sample_video(path, max_frames=5, seek="exact")
    assert auto.seek_mode == "keyframe" and auto.keyframe_interval == pytest.approx(2.0)
    gap = auto.targets[1] - auto.targets[0]
    assert all(abs(t - target) <= gap / 2 + 1e-6 for t, target in zip(auto.times, auto.targets))
    # target 360 would land on keyframe 250 (4.4 s away): decoded forward to the exact frame instead
    assert [frame_index(f) for f in auto.frames][-1] == 360 and auto.keyframe_fallbacks == 1
    assert _pixels(auto)[-1] == _pixels(exact)[-1]


def test_seek_argument() -> None:
    with pytest.raises(InputError, match="seek='fast'"):
        sample_video("whatever.mp4", seek="fast")
    with pytest.raises(InputError, match="disagree"):
        sample_video("whatever.mp4", seek="exact", keyframes=True)


def test_stream_without_duration(tmp_path: Path) -> None:
    # A raw H.264/MPEG-4 elementary stream has no container duration and no packet timestamps.
    fmt, ext = ("h264", "h264") if _codec() == "libx264" else ("m4v", "m4v")
    path = make_video(tmp_path / f"raw.{ext}", 40, fmt=fmt)
    frames = sample_frames(path, max_frames=8)
    assert [frame_index(f) for f in frames] == [int((i + 0.5) * 40 / 8) for i in range(8)]
    assert [frame_index(f) for f in sample_frames(path, max_frames=100)] == list(range(40))


def test_progress_bar_runs(short_video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = sample_frames(short_video, max_frames=5, progress=True)
    assert len(frames) == 5
    assert "video frames" in capsys.readouterr().err


def test_errors_name_the_path(tmp_path: Path, short_video: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(InputError, match="missing.mp4.*file not found"):
        sample_frames(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 10)
    with pytest.raises(InputError, match="notes.mp4.*cannot be read") as ei:
        sample_frames(text)
    assert "\n" not in str(ei.value)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="garbage.mp4"):
        sample_frames(garbage)
    data = short_video.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])  # the moov atom is at the end: unreadable
    with pytest.raises(InputError, match="truncated.mp4"):
        sample_frames(truncated)
    with pytest.raises(InputError, match="directory"):
        sample_frames(tmp_path)
    with pytest.raises(InputError, match="max_frames"):
        sample_frames(short_video, max_frames=0)
    with pytest.raises(InputError, match="fps"):
        sample_frames(short_video, fps=0)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    with pytest.raises(InputError, match="tone.wav.*no video stream"):
        sample_frames(path)


def test_processor_with_video_path(short_video: Path) -> None:
    vocab = {"[UNK]": 0, "<|image|>": 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.add_special_tokens(["<|image|>"])
    proc = Owl3Processor(tok, "240728", 28)
    out = proc([{"role": "user", "content": "<|video|>"}], videos=[str(short_video)], max_frames=5)
    assert out.pixel_values.shape == (5, 3, 28, 28)
    assert out.prompt.count("<|image|>") == 5 and len(out.image_positions) == 5
    out = proc([{"role": "user", "content": "<|video|>"}], videos=str(short_video), fps=0.5)
    assert out.pixel_values.shape == (5, 3, 28, 28)
    with pytest.raises(InputError, match="nope.mp4"):
        proc([{"role": "user", "content": "<|video|>"}], videos=["nope.mp4"])
