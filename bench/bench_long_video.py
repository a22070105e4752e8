"""Sampling 400 frames from a 2-hour video: seek + decode forward vs decoding the whole stream, and what the
default (seek="auto") does on a video with sparse keyframes.

Generates (once, cached in --workdir) two low-resolution test videos of --hours hours:
- dense: --fps fps with a keyframe every --keyint seconds (default 4 fps, a keyframe every 4 s = 16 frames);
- sparse: --sparse-fps fps with a keyframe every --sparse-gop frames and no scene-cut keyframes (default
  25 fps, one every 250 frames = 10 s, common for real files: exact seeking decodes ~125 frames per kept);
plus the dense one at 1/12 the length. Each run in a fresh process (so peak RSS is that run's own):
- full: decode every frame of the dense stream (what a naive reader does), keep 400;
- exact: hyperowl's sampler with seek="exact" (seek to the keyframe before each target, decode forward to
  the exact frame);
- keyframes: seek="keyframe" (the old keyframes=True: keep the keyframe a seek lands on, however far);
- auto: the default (the nearest keyframe when the targets are >= 1.5 measured keyframe intervals apart,
  exact otherwise; the mode it used is in the `used` column);
- the exact sampler on the short video, to show memory does not grow with the video's length.
Reports wall time (fastest of --repeats runs), frames decoded (and packets sent to the decoder) per frame
kept, seeks, the max time error of the kept frames vs the exact path's frames on the same video, and peak
RSS; prints a table, writes JSON and a PNG.

    python bench/bench_long_video.py                    # 2 h, 400 frames
    python bench/bench_long_video.py --hours 0.05 --frames 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_video(path: Path, seconds: float, fps: int, keyint: float, size: tuple[int, int] = (96, 64)) -> Path:
    import av
    from tqdm import tqdm

    from hyperowl.data.synthetic import video_codec

    w, h = size
    n = int(seconds * fps)
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as out:
        codec = video_codec()
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        gop = max(1, int(round(keyint * fps)))
        stream.gop_size = gop
        # a keyframe every `gop` frames exactly: no scene-cut keyframes, no shorter GOPs
        opts = {"keyint_min": str(gop), "sc_threshold": "0"}
        if codec == "libx264":
            opts["preset"] = "ultrafast"
        stream.options = opts
        base = np.zeros((h, w, 3), np.uint8)
        for k in tqdm(range(n), desc=f"writing {seconds / 3600:.2f} h test video ({fps} fps, GOP {gop})", unit="frame",
                      mininterval=1):
            img = base.copy()
            img[:] = ((k // fps) * 7 % 200 + 30, (k // (fps * 60)) * 13 % 200 + 30, 120)  # changes every second / minute
            x = (k * 3) % (w - 12)
            img[20:32, x:x + 12] = (250, 250, 250)  # a moving square
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def keyframe_stats(path: Path) -> dict:
    """Packets, keyframes and the largest keyframe spacing (packets) of the file's video stream: demux only."""
    import av

    with av.open(str(path)) as c:
        flags = [p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size]
    keys = [i for i, k in enumerate(flags) if k]
    spacing = max([b - a for a, b in zip(keys, keys[1:])] + [len(flags) - keys[-1]]) if keys else len(flags)
    return {"packets": len(flags), "keyframes": len(keys), "max_gop_packets": spacing}


def worker(mode: str, path: str, frames: int) -> dict:
    import av

    from hyperowl.processing.video import sample_video

    t = time.perf_counter()
    if mode == "full":
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            decoded = sum(1 for _ in c.decode(s))
        res = {"frames_decoded": decoded, "packets_decoded": decoded, "seeks": 0, "kept": frames, "used": "full",
               "keyframe_interval_s": None, "times": None, "targets": None}
    else:
        v = sample_video(path, max_frames=frames, seek={"keyframes": "keyframe"}.get(mode, mode), progress=False)
        res = {"frames_decoded": v.frames_decoded, "packets_decoded": v.packets_decoded, "seeks": v.seeks,
               "kept": len(v.frames), "used": v.seek_mode, "keyframe_interval_s": v.keyframe_interval,
               "probe_packets": v.probe_packets, "keyframe_fallbacks": v.keyframe_fallbacks, "times": v.times,
               "targets": v.targets}
    res["seconds"] = time.perf_counter() - t
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--fps", type=int, default=4)
    ap.add_argument("--keyint", type=float, default=4.0, help="seconds between keyframes")
    ap.add_argument("--sparse-fps", type=int, default=25, help="frame rate of the sparse-keyframe video")
    ap.add_argument("--sparse-gop", type=int, default=250, help="frames between keyframes of the sparse video")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (each a fresh process); the fastest is reported")
    ap.add_argument("--workdir", default="/tmp/hyperowl-bench")
    ap.add_argument("--out", default="bench/results/long_video.json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    specs = {  # name: (hours, fps, seconds between keyframes)
        "dense": (a.hours, a.fps, a.keyint),
        "short": (a.hours / 12, a.fps, a.keyint),
        "sparse": (a.hours, a.sparse_fps, a.sparse_gop / a.sparse_fps),
    }
    videos = {}
    for name, (hours, fps, keyint) in specs.items():
        p = wd / f"test_{hours:.3f}h_{fps}fps_k{keyint:g}.mp4"
        videos[name] = p if p.exists() else make_video(p, hours * 3600, fps, keyint)
    kstats = {name: keyframe_stats(p) for name, p in videos.items()}
    # exact first on each video: the other modes' time errors are measured against its frames
    runs = [("full", "dense"), ("exact", "dense"), ("keyframes", "dense"), ("auto", "dense"), ("exact", "short"),
            ("exact", "sparse"), ("keyframes", "sparse"), ("auto", "sparse")]
    rows = []
    exact_times: dict[str, list[float]] = {}
    for mode, which in runs:
        tries = []
        for _ in range(a.repeats):
            r = subprocess.run([sys.executable, __file__, "--worker", mode, str(videos[which]), str(a.frames)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr[-3000:])
            tries.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = min(tries, key=lambda t: t["seconds"])  # the rest is the same every run
        row["seconds_all"] = [t["seconds"] for t in tries]
        row["peak_rss_bytes"] = max(t["peak_rss_bytes"] for t in tries)
        hours, fps, keyint = specs[which]
        row.update(mode=mode, video=which, video_hours=hours, fps=fps, keyint_s=keyint,
                   keyint_frames=int(round(keyint * fps)), **{f"file_{k}": v for k, v in kstats[which].items()})
        row["decoded_per_kept"] = row["frames_decoded"] / max(1, row["kept"])
        row["packets_per_kept"] = row["packets_decoded"] / max(1, row["kept"])
        times, targets = row.pop("times"), row.pop("targets")
        if mode == "exact":
            exact_times[which] = times
        ref = exact_times.get(which)
        if times is not None and ref is not None:
            row["max_error_s"] = max(abs(t - e) for t, e in zip(times, ref))
            row["max_error_vs_target_s"] = max(abs(t - g) for t, g in zip(times, targets))
            row["gap_s"] = min(b - a for a, b in zip(targets, targets[1:])) if len(targets) > 1 else hours * 3600
        else:
            row["max_error_s"] = row["max_error_vs_target_s"] = row["gap_s"] = None
        rows.append(row)
    full = rows[0]["seconds"]
    print(f"\n{a.frames} frames kept from each video (dense: {a.fps} fps, a keyframe every {a.keyint:g} s; "
          f"sparse: {a.sparse_fps} fps, a keyframe every {a.sparse_gop} frames)")
    print(f"{'mode':>9} {'used':>8} {'video':>6} {'hours':>6} {'keyint s':>8} {'K meas':>6} {'seconds':>8} {'vs full':>8} "
          f"{'decoded':>8} {'per kept':>9} {'pkts/kept':>9} {'seeks':>6} {'max err s':>9} {'gap s':>6} {'peak MiB':>9}")
    for r in rows:
        r["speedup_vs_full"] = full / r["seconds"] if r["video"] == "dense" else None
        vs = f"{r['speedup_vs_full']:>7.1f}x" if r["speedup_vs_full"] is not None else f"{'-':>8}"
        k = f"{r['keyframe_interval_s']:>6.1f}" if r.get("keyframe_interval_s") is not None else f"{'-':>6}"
        err = f"{r['max_error_s']:>9.2f}" if r["max_error_s"] is not None else f"{'-':>9}"
        gap = f"{r['gap_s']:>6.1f}" if r["gap_s"] is not None else f"{'-':>6}"
        print(f"{r['mode']:>9} {r['used']:>8} {r['video']:>6} {r['video_hours']:>6.2f} {r['keyint_s']:>8g} {k} "
              f"{r['seconds']:>8.2f} {vs} {r['frames_decoded']:>8} {r['decoded_per_kept']:>9.2f} "
              f"{r['packets_per_kept']:>9.2f} {r['seeks']:>6} {err} {gap} {r['peak_rss_bytes'] / 2 ** 20:>9.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hours": a.hours, "fps": a.fps, "keyint_s": a.keyint, "sparse_fps": a.sparse_fps,
                               "sparse_gop": a.sparse_gop, "frames": a.frames, "repeats": a.repeats,
                               "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['mode']}\n{r['video']} {r['video_hours']:.2g} h" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    axes[0].bar(labels, [r["seconds"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("seconds to get the frames")
    axes[0].set_yscale("log")
    axes[1].bar(labels, [r["decoded_per_kept"] for r in rows], color="tab:orange")
    axes[1].axhline(2, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("frames decoded per frame kept")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{a.frames} frames from a {a.hours:g} h video (dense: keyframe every {a.keyint:g} s at {a.fps} fps; "
                 f"sparse: every {a.sparse_gop} frames at {a.sparse_fps} fps)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
