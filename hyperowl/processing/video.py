"""Video frame sampling with PyAV, decoding only what is needed.

Design note
-----------
Targets are timestamps (seconds from the stream start):
  * uniform (default): the centres of N equal segments of the duration, N = min(max_frames, frame count);
  * `fps` given: one every 1/fps seconds starting at 0, then, if more than max_frames, uniformly
    subsampled by segment centres (the official README's 1-fps + `uniform_sample` recipe).
For each target we return the frame *displayed* at that time: the last frame whose timestamp is <= the
target (a frame is shown from its pts until the next one). With N equal to the frame count this picks
every frame exactly once, and fps targets land exactly on frame timestamps.

Decoding is sequential, but when the next target is more than `seek_threshold` seconds ahead of the last
decoded frame we `seek` (backward, to the keyframe before the target, on the video stream) and decode
forward from there. Only the chosen frames are converted to RGB images. What a seek keeps is the `seek`
mode (`iter_video(..., seek=...)`; the mode used is recorded on `VideoSample.seek_mode`):
  * "exact": decode forward from the keyframe to the frame displayed at the target (the rule above). A
    long video costs about (frames per GOP) / 2 decodes per kept frame: ~125 with a keyframe every 250
    frames (10 s at 25 fps, common for real files).
  * "keyframe" (old `keyframes=True`): keep the keyframe the seek lands on, at or before the target, however
    far it is: one decoded frame per kept frame, frames up to one keyframe interval early.
  * "auto" (default): measure the keyframe interval K, then use keyframes when the targets are at least
    `AUTO_GAP_FACTOR` (1.5) intervals apart, far enough apart that the sampler seeks at all
    (> seek_threshold) and the keyframes more than `AUTO_MIN_GOP` (2) frames apart (else exact costs as
    little, e.g. all-intra files), exact otherwise. Where it uses keyframes it takes the *nearest* one: it
    seeks to target + K/2, i.e. to the last keyframe at or before that, which on a regular GOP is the
    keyframe nearest the target, so the time error is at most K/2, a third of the sampling gap or less
    (it then also seeks wherever a target is more than K/2 ahead, not only past seek_threshold). A landed
    keyframe further than half the gap from its target (irregular GOPs) is not used: that target is
    decoded forward exactly (counted in `VideoSample.keyframe_fallbacks`), so every kept frame stays
    inside its own sampling segment and no frame is picked twice. Short gaps (dense sampling, short
    clips, dense keyframes) therefore get the exact frames, bit for bit the same as "exact"; long
    videos sampled sparsely cost about one decoded frame per kept frame.
K is measured, not assumed: the largest spacing between the first `KEYFRAME_PROBE` (6) keyframes (and, if
the file ends first, the stretch after the last one), read from the container's index where it lists
every sample at open (MP4/MOV/AVI: nothing is read), else by a second demuxer reading packets from the
start of the file (no decoding; `VideoSample.probe_packets` counts them). It stops early, with a lower
bound, once the spacing seen rules keyframes out (a spacing past gap / AUTO_GAP_FACTOR); fewer than two
keyframes give no interval. It is skipped when no seek can happen (gap <= seek_threshold, no pts) or the
mode is forced. `VideoSample.keyframe_interval` holds it.
`VideoSample.frames_decoded` counts frames the decoder returned, `packets_decoded` the packets sent to it
(with frame threading a decoder takes a few packets before it returns the first frame after a seek).

Duration comes from the stream, else the container; if neither is known we scan the packets once
(demuxing only, no decoding) for timestamps or, for raw elementary streams without pts, packet durations
or the packet count; such streams are decoded straight through (seeking needs timestamps).

Missing/unreadable files, files without a video stream and still images (FFmpeg opens a PNG or JPEG as a
one-frame "video"; animated GIF/APNG are accepted) raise `InputError` naming the path; PyAV exceptions never
escape for those. More than `hyperowl.limits.MAX_FRAMES` frames per video is an error too. A few corrupt packets inside an otherwise readable file are skipped
(with a warning); more than `MAX_BAD_PACKETS` make the file an error.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Iterator, Optional

import av
from PIL import Image
from tqdm import tqdm

from hyperowl import limits
from hyperowl.errors import InputError

logger = logging.getLogger(__name__)

# Seek instead of decoding forward when the next target is further ahead than this (seconds).
DEFAULT_SEEK_THRESHOLD = 2.0
# Give up on a file after this many undecodable packets.
MAX_BAD_PACKETS = 50
# Timestamps closer than this are the same instant (float noise in pts * time_base).
_TIME_EPS = 1e-4
# seek="auto" keeps the nearest keyframe when the targets are at least this many keyframe intervals apart.
AUTO_GAP_FACTOR = 1.5
# ... and the keyframes are more than this many frames apart (else exact costs as little).
AUTO_MIN_GOP = 2
# seek="auto" measures the keyframe interval from this many keyframes at the start of the file.
KEYFRAME_PROBE = 6
SEEK_MODES = ("auto", "exact", "keyframe")


@dataclass
class VideoSample:
    """Frames sampled from a video, with their timestamps and decode statistics."""

    frames: list[Image.Image]
    times: list[float]  # seconds from the stream start, one per frame
    targets: list[float] = field(default_factory=list)  # requested timestamps
    duration: float = 0.0
    frames_decoded: int = 0  # frames the decoder returned
    seeks: int = 0
    seek_mode: str = ""  # the mode used: "exact" or "keyframe" (see the module note; "auto" resolves to one)
    seek_requested: str = ""  # the mode asked for: "auto", "exact" or "keyframe"
    keyframe_interval: Optional[float] = None  # seconds, measured by seek="auto" (a lower bound if > gap / 1.5)
    keyframe_fallbacks: int = 0  # auto keyframe mode: targets decoded exactly because the keyframe was too far
    packets_decoded: int = 0  # packets sent to the decoder
    probe_packets: int = 0  # packets demuxed (not decoded) to measure the keyframe interval

    @property
    def decoded_per_kept(self) -> float:
        """Frames decoded per frame kept (sampled)."""
        return self.frames_decoded / max(1, len(self.times))


def _av_errors() -> tuple[type[BaseException], ...]:
    # av.error.FFmpegError subclasses OSError/ValueError in recent PyAV; list both to be version-proof.
    errs: list[type[BaseException]] = [OSError, ValueError]
    ff = getattr(getattr(av, "error", None), "FFmpegError", None)
    if isinstance(ff, type):
        errs.append(ff)
    return tuple(errs)


_AV_ERRORS = _av_errors()


def _fail(path: str, why: str) -> InputError:
    return InputError(f"video '{path}': cannot be read ({why}); pass an MP4/MKV/WebM/AVI/MOV video file")


def _open(path: str) -> "av.container.InputContainer":
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        raise _fail(path, "it is a directory")
    try:
        container = av.open(path, mode="r")
    except _AV_ERRORS as exc:
        raise _fail(path, str(exc) or type(exc).__name__) from None
    if not container.streams.video:
        container.close()
        raise InputError(f"video '{path}': has no video stream; pass a file that contains video")
    fmt = container.format.name or ""
    if fmt == "image2" or fmt.endswith("_pipe") or (fmt == "gif" and container.streams.video[0].frames == 1):
        container.close()  # image demuxers: one still picture, not a clip to sample frames from
        raise InputError(f"video '{path}': is a still image ({fmt.removesuffix('_pipe')}), not a video; "
                         "pass it as an image, or pass a video file")
    return container


def _check_sampling(max_frames: int, fps: Optional[float]) -> None:
    if not 1 <= max_frames <= limits.MAX_FRAMES:
        raise InputError(f"max_frames={max_frames}: must be between 1 and {limits.MAX_FRAMES} "
                         "(hyperowl.limits.MAX_FRAMES)")
    if fps is not None and not fps > 0:
        raise InputError(f"fps={fps}: must be a positive number of frames per second")


def _scan_packets(path: str, rate: float) -> tuple[float, int, bool]:
    """(duration seconds, packet count, packets have pts) by demuxing the video stream once, no decoding."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base or Fraction(1, 1)
        start: Optional[int] = None
        end: Optional[int] = None
        count = 0
        summed = 0  # sum of packet durations, for streams without pts (raw elementary streams)
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # flush packet
            count += 1
            dur = max(packet.duration or 0, 0)
            summed += dur
            if packet.pts is not None:
                start = packet.pts if start is None else min(start, packet.pts)
                end = packet.pts + dur if end is None else max(end, packet.pts + dur)
    except _AV_ERRORS as exc:
        raise _fail(path, str(exc) or type(exc).__name__) from None
    finally:
        container.close()
    if start is not None and end is not None and end > start:
        return float((end - start) * tb), count, True
    if summed > 0:
        return float(summed * tb), count, False
    return count / rate, count, False


@dataclass
class _StreamInfo:
    start: float  # seconds of the first frame's pts
    duration: float  # seconds
    count: int  # frames (0 if unknown)
    has_pts: bool  # frames carry timestamps (seeking is only reliable then)


def _stream_info(container: "av.container.InputContainer", path: str) -> _StreamInfo:
    stream = container.streams.video[0]
    tb = stream.time_base
    start = float(stream.start_time * tb) if (stream.start_time is not None and tb) else 0.0
    rate_q = stream.guessed_rate or stream.average_rate
    rate = float(rate_q) if rate_q else 25.0
    duration = 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / av.time_base - max(start, 0.0)
    count = int(stream.frames or 0)
    has_pts = True
    if duration <= 0:
        # No usable duration in the headers (e.g. raw streams): scan the packets once.
        duration, scanned, has_pts = _scan_packets(path, rate)
        count = scanned or count
        logger.debug("video %s: no header duration, scanned %d packets -> %.3fs", path, scanned, duration)
    if count <= 0 and duration > 0:
        count = max(1, round(duration * rate))
    return _StreamInfo(start=start, duration=duration, count=count, has_pts=has_pts)


def _spacing(events: Iterable[tuple[float, float, bool]], limit: float) -> tuple[float, bool]:
    """(K, decided) from (start s, end s, is keyframe) per sample in file order: K is the largest spacing
    between the first `KEYFRAME_PROBE` keyframes, or a lower bound past `limit` as soon as one shows (a
    spacing, the stretch after the last keyframe, or before the first). If the samples run out first,
    decided is False and K counts the stretch after the last keyframe (inf with fewer than two)."""
    keys: list[float] = []
    span, end = 0.0, -math.inf
    first: Optional[float] = None
    for t, t_end, key in events:
        first = t if first is None else first
        end = max(end, t_end)
        if key:
            if keys:
                span = max(span, t - keys[-1])
            keys.append(t)
            if len(keys) >= KEYFRAME_PROBE or span > limit:
                return span, True
        elif keys and end - keys[-1] > limit:
            return end - keys[-1], True
        elif not keys and end - first > limit:
            return math.inf, True
    if len(keys) < 2:
        return math.inf, False
    return max(span, end - keys[-1]), False  # the last keyframe is shown until the end


def _keyframe_interval(container: "av.container.InputContainer", path: str, limit: float) -> tuple[float, int]:
    """(K seconds, packets demuxed): the keyframe interval of the video stream as `_spacing` measures it.
    From the container's index when it has one (MP4/MOV/AVI list every sample at open: nothing read),
    else by demuxing the file from the start in a second container, without decoding."""
    stream = container.streams.video[0]
    tb = stream.time_base
    if not tb:
        return math.inf, 0
    try:
        entries = stream.index_entries
        n = len(entries) if entries is not None else 0
    except (AttributeError, *_AV_ERRORS):  # PyAV before index_entries
        n = 0
    if n >= 2:

        def samples() -> Iterator[tuple[float, float, bool]]:
            for i in range(n):
                e = entries[i]
                if not e.is_discard:
                    t = float(e.timestamp * tb)
                    yield t, t, e.is_keyframe

        k, decided = _spacing(samples(), limit)
        if decided:  # else the index ran out (it may hold only the keyframes seen so far): demux instead
            return k, 0
    probe = _open(path)
    count = 0

    def packets() -> Iterator[tuple[float, float, bool]]:
        nonlocal count
        for packet in probe.demux(probe.streams.video[0]):
            ts = packet.pts if packet.pts is not None else packet.dts
            if packet.size == 0 or ts is None:
                continue  # flush packet / no timestamp
            count += 1
            t = float(ts * tb)
            yield t, t + float(max(packet.duration or 0, 0) * tb), packet.is_keyframe

    try:
        return _spacing(packets(), limit)[0], count
    except _AV_ERRORS as exc:
        raise _fail(path, str(exc) or type(exc).__name__) from None
    finally:
        probe.close()


def _seek_mode(seek: str, keyframes: Optional[bool]) -> str:
    """The requested mode from `seek` and the older `keyframes` flag (True: "keyframe", False: "exact")."""
    if seek not in SEEK_MODES:
        raise InputError(f"seek={seek!r}: must be one of {', '.join(map(repr, SEEK_MODES))}")
    if keyframes is None:
        return seek
    forced = "keyframe" if keyframes else "exact"
    if seek not in ("auto", forced):
        raise InputError(f"seek={seek!r} and keyframes={keyframes!r} disagree; pass only seek=")
    return forced


def _target_gap(targets: list[float], duration: float) -> float:
    """Smallest spacing between consecutive targets (the duration for a single target)."""
    gaps = [b - a for a, b in zip(targets, targets[1:])]
    return min(gaps) if gaps else duration


def video_targets(duration: float, frame_count: int, max_frames: int, fps: Optional[float],
                  segment: Optional[tuple[float, float]] = None) -> list[float]:
    """Target timestamps (seconds from start), ascending. `segment` (start, end) in seconds: the same rule
    applied to that part of the video only (benchmarks such as MVBench ask about a clip of a longer video)."""
    if segment is not None:
        start, end = float(segment[0]), float(segment[1])
        end = min(end, duration) if duration > 0 else end
        if duration > 0 and start >= duration:
            start = max(0.0, end - 1e-3)  # a segment past the end: its last moment (caller warned)
        length = max(end - start, 0.0)
        frames = max(1, round(frame_count * length / duration)) if frame_count > 0 and duration > 0 else 0
        return [start + t for t in video_targets(length, frames, max_frames, fps)]
    if duration <= 0:
        return [0.0]
    if fps is None:
        n = max_frames if frame_count <= 0 else min(max_frames, frame_count)
        return [(i + 0.5) * duration / n for i in range(n)]
    step = 1.0 / fps
    # Every 1/fps seconds from 0 while inside the video (small epsilon so k*step == duration is excluded).
    count = max(1, math.ceil(duration / step - 1e-9))
    times = [k * step for k in range(count)]
    if len(times) > max_frames:
        gap = len(times) / max_frames
        times = [times[int(i * gap + gap / 2)] for i in range(max_frames)]
    return times


class _Decoder:
    """Forward decoder over one video stream that can seek; tracks how many frames it decoded."""

    def __init__(self, container: "av.container.InputContainer", path: str, info: _StreamInfo) -> None:
        self.container = container
        self.stream = container.streams.video[0]
        self.path = path
        self.start = info.start
        # Without pts, frame k is assumed to start at k * (duration / count).
        self._frame_dt = info.duration / info.count if info.count > 0 else 0.04
        self.frames_decoded = 0
        self.packets_decoded = 0
        self.seeks = 0
        self.missing_pts = False  # a frame without pts was seen: positions are estimates, do not seek
        self._index = 0  # frames since the start, for streams without pts (never seeked)
        self.bad_packets = 0
        self._iter: Iterator[av.VideoFrame] = self._frames()

    def seek(self, t: float) -> None:
        tb = self.stream.time_base
        offset = int(math.floor((t + self.start) / float(tb))) if tb else 0
        try:
            self.container.seek(offset, backward=True, any_frame=False, stream=self.stream)
        except _AV_ERRORS as exc:
            raise _fail(self.path, f"seek failed: {exc}") from None
        self.seeks += 1
        self._iter = self._frames()

    def _frames(self) -> Iterator["av.VideoFrame"]:
        # Decode packet by packet so that a few corrupt packets are skipped instead of ending the video.
        for packet in self.container.demux(self.stream):
            if packet.size:
                self.packets_decoded += 1
            try:
                frames = packet.decode()
            except _AV_ERRORS as exc:
                self.bad_packets += 1
                if self.bad_packets == 1:
                    logger.warning("video %s: skipping undecodable data (%s)", self.path, exc)
                if self.bad_packets > MAX_BAD_PACKETS:
                    raise _fail(self.path, f"more than {MAX_BAD_PACKETS} corrupt packets") from None
                continue
            yield from frames

    def next(self) -> Optional[tuple[float, "av.VideoFrame"]]:
        try:
            frame = next(self._iter, None)
        except InputError:
            raise
        except _AV_ERRORS as exc:
            raise _fail(self.path, str(exc) or type(exc).__name__) from None
        if frame is None:
            return None
        self.frames_decoded += 1
        if frame.pts is not None and frame.time is not None:
            t = float(frame.time) - self.start
        else:
            self.missing_pts = True
            t = self._index * self._frame_dt
        self._index += 1
        return t, frame


def iter_video(
    path: "str | os.PathLike[str]",
    max_frames: int = 16,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
    seek_threshold: float = DEFAULT_SEEK_THRESHOLD,
    keyframes: Optional[bool] = None,
    stats: Optional[VideoSample] = None,
    *,
    seek: str = "auto",
    segment: Optional[tuple[float, float]] = None,
) -> Iterator[tuple[float, Image.Image]]:
    """Yield (timestamp, RGB frame) for each sampled frame as soon as it is decoded (see the module note for
    the rule), so a consumer can work on early frames while later ones decode. `stats`, if given, is
    filled in as decoding goes: targets, duration, seek_mode (and the keyframe interval, if measured) before
    the first frame, then times, frames_decoded, packets_decoded and seeks (its `frames` list stays empty:
    the frames are yielded, not kept). Arguments are checked and the file opened on the first `next()`.
    segment: (start, end) seconds, sample only that part (`video_targets`).

    seek: "auto" (default), "exact" or "keyframe", what a seek keeps (module note). keyframes: the older
    spelling, True for "keyframe", False for "exact" (None: use `seek`)."""
    _check_sampling(max_frames, fps)
    if segment is not None and not (0 <= float(segment[0]) < float(segment[1])):
        raise InputError(f"segment={tuple(segment)}: give (start, end) seconds with 0 <= start < end")
    requested = _seek_mode(seek, keyframes)
    st = stats if stats is not None else VideoSample(frames=[], times=[])
    p = os.fspath(path)
    container = _open(p)
    try:
        stream = container.streams.video[0]
        info = _stream_info(container, p)
        st.duration = info.duration
        if segment is not None and info.duration > 0 and float(segment[0]) >= info.duration:
            logger.warning("video %s: segment %s starts after its end (%.2fs); its last moment is used", p,
                           tuple(segment), info.duration)
        st.targets = video_targets(info.duration, info.count, max_frames, fps, segment)
        # Seeking needs timestamps; raw elementary streams without pts are decoded straight through.
        threshold = seek_threshold if info.has_pts else math.inf
        gap = _target_gap(st.targets, info.duration)
        mode, interval = requested, 0.0
        if requested == "auto":
            mode = "exact"
            if gap > threshold:  # the sampler will seek: is the nearest keyframe close enough?
                interval, st.probe_packets = _keyframe_interval(container, p, gap / AUTO_GAP_FACTOR)
                st.keyframe_interval = interval if math.isfinite(interval) else None
                rate = info.count / info.duration if info.count > 0 and info.duration > 0 else 25.0
                if interval * AUTO_GAP_FACTOR <= gap and interval * rate > AUTO_MIN_GOP + 0.5:
                    mode = "keyframe"
        st.seek_requested, st.seek_mode = requested, mode
        if mode == "keyframe" and gap > threshold:
            # Nearly every target seeks and keeps the first frame: frame threads would decode several packets
            # ahead for each one (up to one per thread) only to drop them at the next seek.
            stream.thread_type = "SLICE"
        else:
            stream.thread_type = "AUTO"  # frame/slice threads: decoding forward is the cost here
        nearest = requested == "auto" and mode == "keyframe"
        if nearest:
            # Seek to target + K/2 (the nearest keyframe on a regular GOP); keep it when it is within half the
            # gap of the target; always seek where decoding forward would cost more than half a GOP.
            tolerance = gap / 2 + _TIME_EPS
            threshold = min(threshold, interval / 2)
        show = progress if progress is not None else (max_frames > 32 and sys.stderr.isatty())
        dec = _Decoder(container, p, info)
        prev: Optional[tuple[float, "av.VideoFrame"]] = None  # last frame with time <= current target
        ahead: Optional[tuple[float, "av.VideoFrame"]] = None  # decoded frame past the current target
        last: Optional[tuple["av.VideoFrame", Image.Image]] = None  # the same frame can serve close targets
        with tqdm(total=len(st.targets), desc="video frames", unit="frame", file=sys.stderr, disable=not show) as bar:
            for target in st.targets:
                latest = ahead if ahead is not None else prev
                position = latest[0] if latest is not None else 0.0
                pick = None
                if target - position > threshold and not dec.missing_pts:
                    prev = ahead = None
                    if nearest:
                        dec.seek(target + interval / 2)
                        item = dec.next()
                        if item is not None and abs(item[0] - target) <= tolerance:
                            pick = prev = item
                        else:  # irregular GOP: this keyframe is too far, decode the exact frame
                            st.keyframe_fallbacks += 1
                            if item is not None and item[0] <= target + _TIME_EPS:
                                prev = item
                            else:
                                dec.seek(target)
                    else:
                        dec.seek(target)
                        if mode == "keyframe":
                            pick = prev = dec.next()
                if pick is None:
                    while True:
                        if ahead is not None:
                            item, ahead = ahead, None
                        else:
                            item = dec.next()
                        if item is None:  # end of stream: the last frame is displayed until the end
                            break
                        if item[0] > target + _TIME_EPS:
                            ahead = item
                            break
                        prev = item
                    pick = prev if prev is not None else ahead
                if pick is None:
                    raise _fail(p, "no decodable video frames")
                if last is None or last[0] is not pick[1]:  # convert each distinct frame once
                    try:
                        last = (pick[1], pick[1].to_image().convert("RGB"))
                    except _AV_ERRORS as exc:
                        raise _fail(p, f"frame conversion failed: {exc}") from None
                st.times.append(pick[0])
                st.frames_decoded, st.packets_decoded, st.seeks = dec.frames_decoded, dec.packets_decoded, dec.seeks
                bar.update(1)
                yield pick[0], last[1]
        logger.debug("video %s: %.2fs, %d targets, seek=%s -> %s (keyframe interval %s), decoded %d frames "
                     "(%d packets) with %d seeks", p, st.duration, len(st.targets), requested, mode,
                     st.keyframe_interval, st.frames_decoded, st.packets_decoded, st.seeks)
    finally:
        container.close()


def sample_video(
    path: "str | os.PathLike[str]",
    max_frames: int = 16,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
    seek_threshold: float = DEFAULT_SEEK_THRESHOLD,
    keyframes: Optional[bool] = None,
    *,
    seek: str = "auto",
    segment: Optional[tuple[float, float]] = None,
) -> VideoSample:
    """Sample up to `max_frames` frames of the video at `path` (see the module note for the rule).

    seek="auto" (default): the nearest keyframe where the targets are far apart compared with the keyframe
    interval (one decoded frame per kept frame on long videos), the exact frame otherwise; "exact": always
    the frame displayed at each target; "keyframe" (or keyframes=True): where the sampler seeks, keep the
    keyframe it lands on (at or before the target), frames up to one keyframe interval early. The mode used
    is `.seek_mode`."""
    st = VideoSample(frames=[], times=[])
    it = iter_video(path, max_frames, fps, progress, seek_threshold, keyframes, stats=st, seek=seek, segment=segment)
    frames = [im for _, im in it]
    st.frames = frames
    return st


def sample_frames_with_times(
    path: "str | os.PathLike[str]",
    max_frames: int = 16,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
) -> tuple[list[Image.Image], list[float]]:
    """Like `sample_frames`, also returning each frame's timestamp in seconds."""
    s = sample_video(path, max_frames=max_frames, fps=fps, progress=progress)
    return s.frames, s.times


def sample_frames(
    path: "str | os.PathLike[str]",
    max_frames: int = 16,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
    segment: Optional[tuple[float, float]] = None,
) -> list[Image.Image]:
    """Sample up to `max_frames` RGB frames from the video at `path` (uniform, or every 1/fps seconds), of
    the whole video or of `segment` (start, end) seconds."""
    return sample_video(path, max_frames=max_frames, fps=fps, progress=progress, segment=segment).frames


def probe_video(path: "str | os.PathLike[str]", max_frames: int = 16, fps: Optional[float] = None) -> list[float]:
    """The times (seconds) `iter_video` will sample, read from the container's headers without decoding a
    frame (a prompt needs only the frame count). Same checks and errors as `iter_video`."""
    _check_sampling(max_frames, fps)
    p = os.fspath(path)
    container = _open(p)
    try:
        info = _stream_info(container, p)
    finally:
        container.close()
    return video_targets(info.duration, info.count, max_frames, fps)


# -- live sources (hyperowl/live.py) ---------------------------------------------------------------------------
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def stream_kind(source: str) -> str:
    """"url", "camera" (a V4L2 device: /dev/videoN or v4l2:/dev/videoN) or "file"."""
    if source.startswith(STREAM_SCHEMES):
        return "url"
    if source.startswith("v4l2:") or source.startswith("/dev/video"):
        return "camera"
    return "file"


def open_stream(source: str, stall_timeout: float = 10.0) -> "av.container.InputContainer":
    """Open a live source with PyAV: a video file, a camera (V4L2) or a stream URL. Every failure is an
    InputError naming the source as given and what to do."""
    kind = stream_kind(source)
    if kind == "file":
        return _open(source)
    try:
        if kind == "camera":
            dev = source[len("v4l2:"):] if source.startswith("v4l2:") else source
            if not os.path.exists(dev):
                raise InputError(f"camera '{source}': no such device; list cameras with `ls /dev/video*` "
                                 "(v4l2-ctl --list-devices) and pass one")
            container = av.open(dev, format="v4l2", timeout=(stall_timeout, stall_timeout))
        else:
            container = av.open(source, timeout=(stall_timeout, stall_timeout))
    except InputError:
        raise
    except _AV_ERRORS as exc:
        raise InputError(f"{kind} '{source}': cannot be opened ({exc or type(exc).__name__}); check that it "
                         "exists, is reachable and plays (e.g. with ffplay)") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{kind} '{source}': has no video stream; pass a source that contains video")
    return container


def iter_stream(source: str, fps: float = 1.0, realtime: bool = True, stop: Optional["threading.Event"] = None,
                stall_timeout: float = 10.0, container: Optional["av.container.InputContainer"] = None
                ) -> Iterator[tuple[float, Image.Image]]:
    """A live source's frames as (stream time in seconds, RGB image), one every 1/fps seconds of stream time
    (the frame displayed at each target), decoded straight through, never seeking: a source may be endless.

    realtime: a file is played at its own pace (wall clock), as a camera or a broadcast would deliver it;
    False: as fast as it decodes (cameras and URLs come at their own pace either way). Ends when the source
    ends (or `stop` is set); a source that stops delivering for `stall_timeout` seconds raises InputError.
    container: the source already opened with `open_stream` (closed here at the end)."""
    if fps <= 0:
        raise InputError(f"fps={fps}: must be a positive number of frames per second")
    container = container or open_stream(source, stall_timeout)
    kind = stream_kind(source)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    step, target, t0, wall0, size = 1.0 / fps, 0.0, None, time.monotonic(), None
    index = 0
    try:
        frames = container.decode(stream)
        while stop is None or not stop.is_set():
            asked = time.monotonic()
            try:
                frame = next(frames, None)
            except _AV_ERRORS as exc:
                waited = time.monotonic() - asked
                # PyAV's read timeout surfaces as AVERROR_EXIT ("Immediate exit requested") or a timed-out I/O
                if waited >= 0.9 * stall_timeout or "exit requested" in str(exc).lower():
                    raise InputError(f"{kind} '{source}': stalled (no data for {waited:.0f} s); the session keeps "
                                     "what it has seen") from None
                raise InputError(f"{kind} '{source}': broke off ({exc or type(exc).__name__}); the session keeps "
                                 "what it has seen") from None
            if frame is None:
                return
            t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
            index += 1
            t0 = t if t0 is None else t0
            t -= t0
            if t + _TIME_EPS < target:
                continue
            if (frame.width, frame.height) != size:
                if size is not None:
                    logger.info("%s '%s': frame size changed from %dx%d to %dx%d at %.1fs; frames are resized "
                                "for the model as before", kind, source, *size, frame.width, frame.height, t)
                size = (frame.width, frame.height)
            if realtime and kind == "file":  # play at the file's own pace
                delay = wall0 + t - time.monotonic()
                if delay > 0:
                    stop.wait(delay) if stop is not None else time.sleep(delay)
            while target <= t + _TIME_EPS:
                target += step
            yield t, frame.to_image()
    finally:
        container.close()
