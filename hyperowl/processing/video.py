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
forward from there. Long videos therefore cost roughly (frames per GOP) x (number of targets) decodes
instead of a full decode; with `keyframes=True` a seek keeps the keyframe it lands on, so a long video
costs about one decoded frame per kept frame. Only the chosen frames are converted to RGB images.

Duration comes from the stream, else the container; if neither is known we scan the packets once
(demuxing only, no decoding) for timestamps or, for raw elementary streams without pts, packet durations
or the packet count; such streams are decoded straight through (seeking needs timestamps).

Missing/unreadable files and files without a video stream raise `InputError` naming the path; PyAV
exceptions never escape for those. A few corrupt packets inside an otherwise readable file are skipped
(with a warning); more than `MAX_BAD_PACKETS` make the file an error.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator, Optional

import av
from PIL import Image
from tqdm import tqdm

from hyperowl.errors import InputError

logger = logging.getLogger(__name__)

# Seek instead of decoding forward when the next target is further ahead than this (seconds).
DEFAULT_SEEK_THRESHOLD = 2.0
# Give up on a file after this many undecodable packets.
MAX_BAD_PACKETS = 50
# Timestamps closer than this are the same instant (float noise in pts * time_base).
_TIME_EPS = 1e-4


@dataclass
class VideoSample:
    """Frames sampled from a video, with their timestamps and decode statistics."""

    frames: list[Image.Image]
    times: list[float]  # seconds from the stream start, one per frame
    targets: list[float] = field(default_factory=list)  # requested timestamps
    duration: float = 0.0
    frames_decoded: int = 0
    seeks: int = 0


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
    return container


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


def video_targets(duration: float, frame_count: int, max_frames: int, fps: Optional[float]) -> list[float]:
    """Target timestamps (seconds from start), ascending."""
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
    keyframes: bool = False,
    stats: Optional[VideoSample] = None,
) -> Iterator[tuple[float, Image.Image]]:
    """Yield (timestamp, RGB frame) for each sampled frame as soon as it is decoded (see the module note for
    the rule), so a consumer can work on early frames while later ones decode. `stats`, if given, is
    filled in as decoding goes: targets and duration before the first frame, then times, frames_decoded and
    seeks (its `frames` list stays empty: the frames are yielded, not kept). Arguments are checked and the
    file opened on the first `next()`."""
    if max_frames < 1:
        raise InputError(f"max_frames={max_frames}: must be at least 1")
    if fps is not None and not fps > 0:
        raise InputError(f"fps={fps}: must be a positive number of frames per second")
    st = stats if stats is not None else VideoSample(frames=[], times=[])
    p = os.fspath(path)
    container = _open(p)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame/slice threads: decoding is the cost here
        info = _stream_info(container, p)
        st.duration = info.duration
        st.targets = video_targets(info.duration, info.count, max_frames, fps)
        # Seeking needs timestamps; raw elementary streams without pts are decoded straight through.
        threshold = seek_threshold if info.has_pts else math.inf
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
                    dec.seek(target)
                    prev = ahead = None
                    if keyframes:
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
                st.frames_decoded, st.seeks = dec.frames_decoded, dec.seeks
                bar.update(1)
                yield pick[0], last[1]
        logger.debug("video %s: %.2fs, %d targets, decoded %d frames with %d seeks", p, st.duration, len(st.targets),
                     st.frames_decoded, st.seeks)
    finally:
        container.close()


def sample_video(
    path: "str | os.PathLike[str]",
    max_frames: int = 16,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
    seek_threshold: float = DEFAULT_SEEK_THRESHOLD,
    keyframes: bool = False,
) -> VideoSample:
    """Sample up to `max_frames` frames of the video at `path` (see the module note for the rule).

    keyframes=True: where the sampler seeks, it keeps the keyframe it lands on (at or before the target)
    instead of decoding forward to the exact frame: one decoded frame per kept frame on long videos, at
    the price of frames up to one keyframe interval early."""
    st = VideoSample(frames=[], times=[])
    frames = [im for _, im in iter_video(path, max_frames, fps, progress, seek_threshold, keyframes, stats=st)]
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
) -> list[Image.Image]:
    """Sample up to `max_frames` RGB frames from the video at `path` (uniform, or every 1/fps seconds)."""
    return sample_video(path, max_frames=max_frames, fps=fps, progress=progress).frames
