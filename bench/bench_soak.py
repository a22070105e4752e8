"""Soak benchmark: K concurrent clients for M minutes against the real server, mixing every kind of request a
server meets, to show that nothing leaks and no request harms another.

The server is a separate process (this file with `--serve-only`: uvicorn on 127.0.0.1 and a free port, the
embedded model by default), so its RSS is measured alone (psutil, every half second). Each client loops,
picking a kind at random:

  valid            a non-streamed chat (text, or an image): 200 with a whole answer
  valid_stream     the same, streamed: 200, one finish chunk, then [DONE]
  invalid          a mistake (malformed or deeply nested JSON, a seed past 64 bits, min_tokens > max_tokens,
                   a bare string in a content list, an unknown model, a broken image): 4xx
  oversized        a body over the server's limit, an image over the media limit, a prompt past the context: 4xx
  cancelled        a long streamed answer, hung up after a few events (the server must cancel the row)
  disconnect_body  the client hangs up in the middle of sending its body (nobody is answered)

Counted: statuses per kind, 5xx (must be 0), lost responses (no answer, or a stream without its finish chunk
or [DONE]: must be 0), duplicated ones (a completion id seen twice, two finish chunks: must be 0), greedy
answers to a repeated prompt that differ from its first answer (rows mixed up in a batch would show here),
and whether the server's scheduler accounts for every job that reached it (completed + cancelled = jobs).
RSS: at start (after a warm-up), at the end, the peak, and over time (PNG).

Prints a table and writes bench/results/soak.json and bench/results/soak_rss.png.

    python bench/bench_soak.py [--clients 8] [--minutes 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install

MODEL_NAME = "soak-owl"
DEFAULT_MODEL = ROOT / "hyperowl" / "assets" / "owl3-synthetic"
MAX_BODY = 1 << 20  # the server's body limit in this bench (small, so oversized bodies are cheap to send)
MAX_MEDIA = 256 << 10
KINDS = {"valid": 30, "valid_stream": 25, "invalid": 15, "oversized": 10, "cancelled": 10, "disconnect_body": 10}
PROMPTS = ["What colour is the circle?", "Describe the picture.", "Compare the two shapes.", "What happens next?"]


# -- the server process ------------------------------------------------------------------------------------

def serve_only(a: argparse.Namespace) -> None:
    import hyperowl
    from hyperowl.serve import ServeConfig, serve

    model = hyperowl.load(a.model, device=a.device)
    cfg = ServeConfig(model_name=MODEL_NAME, max_body_bytes=MAX_BODY, max_media_bytes=MAX_MEDIA, max_images=4,
                      max_batch_size=8, max_queue=256, default_max_tokens=a.max_tokens)
    serve(model, None, cfg, port=a.port, log_level="warning")


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve-only", "--port", str(port), "--model", str(a.model), "--device", a.device,
           "--max-tokens", str(a.max_tokens)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stderr=open(a.server_log, "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {a.server_log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


# -- requests ----------------------------------------------------------------------------------------------

def png_url(size: tuple[int, int], color: tuple[int, int, int], pad: int = 0) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue() + b"\0" * pad).decode()


IMAGES = [png_url((48 + 16 * i, 40), (60 * i, 120, 200 - 40 * i)) for i in range(4)]


def chat(rnd: random.Random, max_tokens: int, stream: bool) -> tuple[dict, str | None]:
    """A valid body, and the key of its expected answer when it is greedy (the same key, the same answer)."""
    p = rnd.randrange(len(PROMPTS))
    content: object = PROMPTS[p]
    img = None
    if rnd.random() < 0.5:
        img = rnd.randrange(len(IMAGES))
        content = [{"type": "image_url", "image_url": {"url": IMAGES[img]}}, {"type": "text", "text": PROMPTS[p]}]
    body = {"model": MODEL_NAME, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": content}]}
    if rnd.random() < 0.5:
        body.update(temperature=0.8, seed=rnd.randrange(2**63))
        return body, None
    return body, f"{p}/{img}/{max_tokens}"


def invalid(rnd: random.Random) -> bytes:
    user = {"role": "user", "content": "Hi"}
    bodies = [
        b'{"model": "soak-owl", "messages": [}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"model": MODEL_NAME, "messages": [user], "temperature": 1.0, "seed": 2**64}).encode(),
        json.dumps({"model": MODEL_NAME, "messages": [user], "max_tokens": 4, "min_tokens": 9}).encode(),
        json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": ["a bare string"]}]}).encode(),
        json.dumps({"model": "gpt-5", "messages": [user]}).encode(),
        json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}]}]}).encode(),
    ]
    return rnd.choice(bodies)


def oversized(rnd: random.Random, context: int) -> bytes:
    which = rnd.randrange(3)
    if which == 0:  # the body itself
        return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}).encode()
    if which == 1:  # one image over the media limit
        big = png_url((32, 32), (1, 2, 3), pad=MAX_MEDIA + 10)
        return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big}}]}]}).encode()
    return json.dumps({"model": MODEL_NAME, "max_tokens": 4, "messages": [  # a prompt past the model's context
        {"role": "user", "content": "The red circle is left of the blue square. " * (context // 4)}]}).encode()


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.lost: Counter = Counter()
        self.duplicated = 0
        self.ids: set[str] = set()
        self.answers: dict[str, str] = {}
        self.differing = 0
        self.jobs = 0  # requests that reached the scheduler (valid, valid_stream, cancelled)
        self.errors: list[str] = []

    def record(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.status[kind][status] += 1
            self.jobs += kind in ("valid", "valid_stream", "cancelled") and status == 200

    def completion(self, cid: str, key: str | None, text: str) -> None:
        with self.lock:
            if cid in self.ids:
                self.duplicated += 1
            self.ids.add(cid)
            if key is not None:
                first = self.answers.setdefault(key, text)
                self.differing += first != text


def read_stream(r: httpx.Response) -> tuple[str | None, str, int, bool]:
    """(completion id, text, finish chunks, ended with [DONE])."""
    cid, text, finishes, done = None, [], 0, False
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        cid = event.get("id", cid)
        for c in event.get("choices", []):
            text.append(c["delta"].get("content") or "")
            finishes += c.get("finish_reason") is not None
    return cid, "".join(text), finishes, done


def one_request(kind: str, url: str, c: httpx.Client, rnd: random.Random, a: argparse.Namespace, tally: Tally,
                context: int) -> None:
    endpoint = url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if kind == "valid":
        body, key = chat(rnd, a.max_tokens, stream=False)
        r = c.post(endpoint, json=body)
        tally.record(kind, r.status_code)
        if r.status_code == 200:
            j = r.json()
            tally.completion(j["id"], key, j["choices"][0]["message"]["content"])
    elif kind == "valid_stream":
        body, key = chat(rnd, a.max_tokens, stream=True)
        with c.stream("POST", endpoint, json=body) as r:
            tally.record(kind, r.status_code)
            if r.status_code == 200:
                cid, text, finishes, done = read_stream(r)
                if finishes == 0 or not done or cid is None:
                    tally.lost[kind] += 1
                if finishes > 1:
                    tally.duplicated += 1
                if cid is not None:
                    tally.completion(cid, key, text)
    elif kind in ("invalid", "oversized"):
        raw = invalid(rnd) if kind == "invalid" else oversized(rnd, context)
        r = c.post(endpoint, content=raw, headers=headers)
        tally.record(kind, r.status_code)
    elif kind == "cancelled":
        body, _ = chat(rnd, a.long_tokens, stream=True)
        body["min_tokens"] = a.long_tokens
        with c.stream("POST", endpoint, json=body) as r:
            tally.record(kind, r.status_code)
            lines = r.iter_lines()
            for _ in range(rnd.randrange(2, 8)):  # a few events, then hang up
                next(lines, None)
    elif kind == "disconnect_body":
        body = json.dumps(chat(rnd, a.max_tokens, stream=False)[0]).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (len(body) + 1000) + body[: rnd.randrange(1, len(body))])
        tally.record(kind, "hung up")


def client(i: int, url: str, a: argparse.Namespace, tally: Tally, stop_at: float, context: int) -> None:
    rnd = random.Random(a.seed * 1000 + i)
    kinds, weights = list(KINDS), list(KINDS.values())
    with httpx.Client(timeout=a.timeout) as c:
        while time.monotonic() < stop_at:
            kind = rnd.choices(kinds, weights)[0]
            try:
                one_request(kind, url, c, rnd, a, tally, context)
            except Exception as e:  # no answer at all (a timeout, a reset, an error event): a lost response
                with tally.lock:
                    tally.lost[kind] += 1
                    tally.errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])


def sample_rss(pid: int, samples: list, stop: threading.Event, t0: float) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        samples.append((time.monotonic() - t0, proc.memory_info().rss))
        stop.wait(0.5)


def plot(samples: list, start_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in samples], [r / 2**20 for _, r in samples], lw=1.2)
    ax.axvline(start_s, color="gray", ls="--", lw=0.8, label="soak starts (after warm-up)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("bench_soak: server memory under mixed load")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="K concurrent clients")
    ap.add_argument("--minutes", type=float, default=3.0, help="M minutes of load")
    ap.add_argument("--model", default=str(DEFAULT_MODEL.relative_to(Path.cwd())) if DEFAULT_MODEL.is_relative_to(Path.cwd())
                    else str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=8, help="answer length of valid requests")
    ap.add_argument("--long-tokens", type=int, default=400, help="answer length asked by requests cancelled mid-stream")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request; longer counts as lost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak.json")
    ap.add_argument("--plot", default="bench/results/soak_rss.png")
    ap.add_argument("--server-log", default=None, help="the server's stderr (default: next to --out)")
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_only:
        return serve_only(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    a.server_log = a.server_log or str(out.with_suffix(".server.log"))

    proc, url = start_server(a)
    samples: list = []
    stop = threading.Event()
    t0 = time.monotonic()
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, stop, t0), daemon=True)
    sampler.start()
    try:
        with httpx.Client(timeout=a.timeout) as c:  # warm-up: every image once (feature cache), both answer paths
            for img in IMAGES:
                c.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2, "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}]}]}).raise_for_status()
        before = httpx.get(url + "/health", timeout=10).json()["scheduler"]
        context = json.loads((Path(a.model) / "config.json").read_text()).get("max_position_embeddings", 4096)
        start_s = time.monotonic() - t0
        rss_start = samples[-1][1] if samples else 0
        tally = Tally()
        stop_at = time.monotonic() + a.minutes * 60
        threads = [threading.Thread(target=client, args=(i, url, a, tally, stop_at, context)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0 - start_s
        # Settle: cancelled rows leave at the next decode step; then every job must be accounted for.
        deadline = time.monotonic() + 30
        while True:
            after = httpx.get(url + "/health", timeout=10).json()["scheduler"]
            if (after["running"] == 0 and after["queued"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        alive = httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        stop.set()
        sampler.join(timeout=5)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    rss_end, rss_peak = samples[-1][1], max(r for _, r in samples)
    accounted = {k: after[k] - before[k] for k in ("completed", "cancelled", "failed")}
    statuses = sorted({s for counts in tally.status.values() for s in counts}, key=str)
    n_5xx = sum(n for counts in tally.status.values() for s, n in counts.items() if isinstance(s, int) and s >= 500)
    lost = sum(tally.lost.values())
    log_text = Path(a.server_log).read_text()
    tracebacks = log_text.count("Traceback")

    print(f"bench_soak: {a.clients} clients x {a.minutes:g} min ({wall:.0f} s), model {a.model}\n")
    print(f"{'kind':<16}{'requests':>9}" + "".join(f"{str(s):>9}" for s in statuses) + f"{'lost':>6}")
    for kind in KINDS:
        counts = tally.status.get(kind, Counter())
        print(f"{kind:<16}{sum(counts.values()) + tally.lost[kind]:>9}" + "".join(f"{counts.get(s, 0):>9}" for s in statuses)
              + f"{tally.lost[kind]:>6}")
    total = sum(sum(c.values()) for c in tally.status.values()) + lost
    print(f"\nrequests {total} ({total / wall:.1f}/s); 5xx {n_5xx}; lost {lost}; duplicated {tally.duplicated}; "
          f"greedy answers differing from the first to the same prompt {tally.differing}")
    print(f"scheduler: {tally.jobs} jobs sent, {sum(accounted.values())} accounted ({accounted}); server alive: {alive}; "
          f"tracebacks in the server log: {tracebacks}")
    print(f"server RSS MiB: start {rss_start / 2**20:.0f}, end {rss_end / 2**20:.0f}, peak {rss_peak / 2**20:.0f} "
          f"(before warm-up {samples[0][1] / 2**20:.0f})")
    for e in tally.errors[:5]:
        print("  lost:", e)

    result = {
        "config": {"clients": a.clients, "minutes": a.minutes, "model": str(a.model), "device": a.device,
                   "max_tokens": a.max_tokens, "long_tokens": a.long_tokens, "mix": KINDS, "seed": a.seed,
                   "machine": platform.machine(), "cpus": os.cpu_count()},
        "wall_s": wall, "requests": total,
        "status_by_kind": {k: {str(s): n for s, n in tally.status.get(k, Counter()).items()} for k in KINDS},
        "lost_by_kind": dict(tally.lost), "lost": lost, "duplicated": tally.duplicated, "n_5xx": n_5xx,
        "greedy_answers_differing": tally.differing, "jobs_sent": tally.jobs, "jobs_accounted": accounted,
        "server_alive": alive, "server_log_tracebacks": tracebacks, "lost_examples": tally.errors[:20],
        "rss_mib": {"before_warmup": samples[0][1] / 2**20, "start": rss_start / 2**20, "end": rss_end / 2**20,
                    "peak": rss_peak / 2**20},
        "rss_over_time": [(round(t, 2), round(r / 2**20, 1)) for t, r in samples],
    }
    out.write_text(json.dumps(result, indent=2))
    if a.plot:
        plot(samples, start_s, Path(a.plot))
    print(f"\nwrote {out}" + (f" and {a.plot}" if a.plot else ""))


if __name__ == "__main__":
    main()
