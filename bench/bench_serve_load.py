"""Serving under load: continuous batching (paged K/V, prefix reuse) vs dynamic batching, against the real server.

Each scheduler runs in its own server process (this file with `--serve-only`: uvicorn on 127.0.0.1, the
embedded model by default, or `--shape a`: bench_vs_llava.py's shape a, Qwen2-0.5B + a 729-token tower with
random weights and the embedded model's tokenizer, or `--shape owl2`: an mPLUG-Owl2 of the same width, `build_owl2`). Both servers are started at the start and the load
alternates between them (rate 1 dynamic, rate 1 continuous, rate 2 dynamic, ...), so a change of the
machine's load over the run touches both alike; only side-by-side numbers are compared.

The workload (stated, seeded; the same requests at the same times for both schedulers):
  arrivals     open loop, Poisson at each --rates value (requests / s) for --duration seconds
  kinds        text 40 %, 1 image 25 %, 8 images 15 %, a 32-frame video 10 %, a chat about 8 images 10 %
               (a chat comes back with a follow-up question as soon as its first answer is complete:
               the history + the answer + a new question)
  prompt       text: U{8..96} words; with media: U{4..24} words of question
  answer       max_tokens = min_tokens ~ round(lognormal(ln 32, 0.6)) clipped to [4, 128] (fixed lengths:
               the random-ish model would otherwise stop at random)
  media        per rate a pool of 12 images (a request picks at random: repeats hit the feature cache, as
               in real traffic), 2 videos (the same video is asked about again)
Measured per scheduler and rate: requests completed (and failed), output tokens/s (completion tokens over
first arrival to last answer), TTFT p50/p99 (to the first content chunk), inter-token latency p50/p99 (gap
between content chunks), the follow-up turns' TTFT, and the server's peak RSS (psutil, every 0.25 s).

Then three cases: (1) a 2-token request sent while a 400-token answer streams (its latency vs the long
answer's); (2) the follow-up turn of a chat about 8 images, on chat
completions (the client sends the answer's text back) and on the Responses API (previous_response_id: the
stored answer's exact ids): its TTFT on the continuous server (prefix reuse) vs the same history prefilled
fresh (a continuous server without the prefix cache, and the dynamic one; the feature cache holds the images
in all three, so only the K/V reuse differs); (3) K/V bytes per request vs
its size in a mixed batch (in this process, on the engines directly): the continuous engine's blocks
(request_info kv_bytes) vs the dynamic engine's padded cache per row (KVCache.nbytes / batch size).

Prints tables, writes JSON and a PNG (TTFT and inter-token latency vs output tokens/s).

    python bench/bench_serve_load.py                         # embedded model, rates 0.5 1 2 4
    python bench/bench_serve_load.py --shape a --rates 0.1 0.2 0.4 --duration 60
    python bench/bench_serve_load.py --smoke                 # < 60 s (tests/test_serve_load_bench.py)
    python bench/bench_serve_load.py --shape a --followup-only --history 32 256 512 32,256   # the follow-up alone
    python bench/bench_serve_load.py --shape owl2 --followup-only                # Owl2: images are rows in the text
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install

MODEL_NAME = "load-owl"
DEFAULT_MODEL = ROOT / "hyperowl" / "assets" / "owl3-synthetic"
MIX = {"text": 0.40, "image": 0.25, "images8": 0.15, "video32": 0.10, "chat8": 0.10}
SCHEDULERS = ("dynamic", "continuous")


# -- the server process ------------------------------------------------------------------------------------

def build_shape_a(a: argparse.Namespace):
    """bench_vs_llava.py's shape a (random weights) with the embedded model's tokenizer and processor."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_vs_llava import SHAPES, build_ours

    torch.manual_seed(0)
    m, v = SHAPES["a"]
    return text_head_pipeline(build_ours(m, v, getattr(torch, a.dtype), a.device))


def build_owl2(a: argparse.Namespace):
    """An mPLUG-Owl2 in the spirit of shape a (random weights): a LLaMA of Qwen2-0.5B's width and depth (896 x 24,
    14 heads, GQA 2, MLP 4864, LLaMA-2's 32000-token vocabulary, untied head), shape a's small tower as its ViT
    (256 x 3 layers, 378 px / 14 = 729 patches + CLS) and a 3-layer 256-wide abstractor with the released 64
    queries: each image is 65 rows IN the text sequence (Owl3 keeps them out of it)."""
    import torch

    from hyperowl.config import AbstractorConfig, ClipVitConfig, Owl2Config
    from hyperowl.models.owl2 import Owl2Model

    torch.manual_seed(0)
    cfg = Owl2Config(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                     num_kv_heads=2, max_position_embeddings=8192, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                     vision=ClipVitConfig(hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4,
                                          image_size=378, patch_size=14),
                     abstractor=AbstractorConfig(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=704,
                                                 num_queries=64, grid_size=27, encoder_hidden_size=256))
    with torch.device("meta"):
        model = Owl2Model(cfg)
    model = model.to(getattr(torch, a.dtype)).to_empty(device=a.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.init_tables(a.device)  # the abstractor's sin-cos tables (buffers: to_empty left them unset)
    return text_head_pipeline(model)


def text_head_pipeline(model):
    """A random-weight model served with the embedded model's tokenizer (the family's processor)."""
    import torch

    from hyperowl.families import family_of
    from hyperowl.pipeline import Pipeline
    from hyperowl.processing.processor import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    # Random weights pick ids all over the large vocabulary, which the small tokenizer decodes to no text:
    # no content chunk would ever stream (no TTFT). Rows past the tokenizer's vocabulary get zero logits (their
    # output rows zeroed; the head keeps its full size, so a step costs what it costs), so answers are text.
    with torch.no_grad():
        head = model.lm_head.weight if model.lm_head is not None else model.decoder.embed_tokens.weight
        head[tokenizer.get_vocab_size():] = 0
    family = family_of(model.config)
    return Pipeline(model, family.processor(tokenizer, model.config), family=family)


def build_model(a: argparse.Namespace):
    import hyperowl

    builders = {"a": build_shape_a, "owl2": build_owl2}
    return builders[a.shape](a) if a.shape else hyperowl.load(a.model, device=a.device)


def serve_only(a: argparse.Namespace) -> None:
    import torch

    from hyperowl.serve import ServeConfig, serve

    torch.set_num_threads(a.threads)
    model = build_model(a)
    cfg = ServeConfig(model_name=MODEL_NAME, batching=a.batching, kv_cache_gb=a.kv_cache_gb, max_images=8,
                      max_frames=a.frames, cut=False, max_queue=1024, max_batch_size=8, max_running=a.max_running,
                      prefix_cache=not a.no_prefix_cache, default_max_tokens=64)
    serve(model, None, cfg, port=a.port, log_level="warning")


def start_server(a: argparse.Namespace, batching: str, log: Path, prefix_cache: bool = True
                 ) -> tuple[subprocess.Popen, str]:
    """Launch a server process (returns at once; `wait_ready` waits for its /health)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve-only", "--batching", batching, "--port", str(port), "--model",
           str(a.model), "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads), "--frames",
           str(a.frames), "--shape", a.shape or "", "--max-running", str(a.max_running)]
    if a.kv_cache_gb is not None:
        cmd += ["--kv-cache-gb", str(a.kv_cache_gb)]
    if not prefix_cache:
        cmd.append("--no-prefix-cache")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stderr=open(log, "w"))
    return proc, f"http://127.0.0.1:{port}"


def stop_servers(servers: dict[str, subprocess.Popen]) -> None:
    """Terminate every server, then wait for each (killed after 20 s)."""
    for p in servers.values():
        p.terminate()
    for p in servers.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def model_name(a: argparse.Namespace) -> str:
    """What the results say was served."""
    if a.shape:
        return {"a": "shape a (bench_vs_llava.py, random weights)", "owl2": "Owl2, shape a's width (random weights)"}[a.shape]
    return "the embedded model" if Path(a.model).resolve() == DEFAULT_MODEL.resolve() else a.model


def wait_ready(proc: subprocess.Popen, url: str, batching: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {batching} server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the {batching} server did not start within 300 s")


class RssSampler:
    """The server process's RSS every 0.25 s; `peak_since(mark)` gives a window's peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc, self.samples, self.stop = psutil.Process(pid), [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except Exception:  # the process ended
                return
            self.stop.wait(0.25)

    def peak(self, t0: float, t1: float) -> float:
        inside = [r for t, r in self.samples if t0 <= t <= t1]
        return max(inside, default=0) / 2**20


# -- media and the workload --------------------------------------------------------------------------------

def png_url(rnd: random.Random, size: int) -> str:
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(rnd.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_url(frames: int, seed: int) -> str:
    import av
    import numpy as np

    from hyperowl.data.synthetic import video_codec

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mp4"
        container = av.open(str(path), "w")
        stream = container.add_stream(video_codec(), rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(seed)
        for _ in range(frames):
            img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(p)
        for p in stream.encode():
            container.mux(p)
        container.close()
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


WORDS = ("the red circle blue square green triangle left right above below near far large small picture frame "
         "scene moves stays what where why how many colour shape").split()


def words(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))) + "?"


def answer_len(rnd: random.Random, cap: int) -> int:
    return max(4, min(cap, round(math.exp(rnd.gauss(math.log(32), 0.6)))))


def image_parts(urls: list[str], text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]


def workload(rate: float, duration: float, seed: int, a: argparse.Namespace) -> list[dict]:
    """The rate's requests: arrival time, kind, body (and a follow-up question for chats)."""
    rnd = random.Random(seed)
    images = [png_url(rnd, a.image_px) for _ in range(12)]
    videos = [video_url(a.frames, seed * 10 + i) for i in range(2)]
    out, t = [], 0.0
    kinds, weights = list(MIX), list(MIX.values())
    while True:
        t += rnd.expovariate(rate)
        if t > duration:
            return out
        kind = rnd.choices(kinds, weights)[0]
        n = answer_len(rnd, a.max_answer)
        if kind == "text":
            content: object = words(rnd, 8, 96)
        elif kind == "image":
            content = image_parts([rnd.choice(images)], words(rnd, 4, 24))
        elif kind in ("images8", "chat8"):
            content = image_parts(rnd.sample(images, 8), words(rnd, 4, 24))
        else:
            content = [{"type": "video_url", "video_url": {"url": rnd.choice(videos)}},
                       {"type": "text", "text": words(rnd, 4, 24)}]
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": n,
                "min_tokens": n, "stream": True, "stream_options": {"include_usage": True}}
        item = {"t": t, "kind": kind, "body": body}
        if kind == "chat8":
            item["followup"] = (words(rnd, 4, 24), answer_len(rnd, a.max_answer))
        out.append(item)


# -- the load generator ------------------------------------------------------------------------------------

async def stream_one(c: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: status, TTFT, content-chunk times, completion tokens, text."""
    t0 = time.monotonic()
    rec = {"sent": t0, "status": None, "ttft": None, "gaps": [], "tokens": 0, "text": "", "done": None,
           "cached_tokens": 0}
    try:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec["error"] = r.text[:200]
                return rec
            last, text = None, []
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec["status"], rec["error"] = 500, str(ev["error"])[:200]
                    return rec
                if ev.get("usage"):
                    rec["tokens"] = ev["usage"]["completion_tokens"]
                    rec["cached_tokens"] = ev["usage"]["prompt_tokens_details"].get("cached_tokens", 0)
                    rec["usage"] = ev["usage"]
                for ch in ev.get("choices", []):
                    if ch["delta"].get("content"):
                        now = time.monotonic()
                        if last is None:
                            rec["ttft"] = now - t0
                        else:
                            rec["gaps"].append(now - last)
                        last = now
                        text.append(ch["delta"]["content"])
            rec["text"] = "".join(text)
            rec["done"] = time.monotonic()
    except Exception as e:  # a lost response: counted as failed
        rec["status"], rec["error"] = "lost", f"{type(e).__name__}: {e}"[:200]
    return rec


async def run_load(url: str, items: list[dict], timeout: float) -> list[dict]:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
        t0 = time.monotonic()

        async def one(item: dict) -> list[dict]:
            await asyncio.sleep(max(0.0, t0 + item["t"] - time.monotonic()))
            rec = dict(await stream_one(c, url, item["body"]), kind=item["kind"])
            recs = [rec]
            if "followup" in item and rec["status"] == 200:  # the chat comes back with its next question
                q, n = item["followup"]
                msgs = item["body"]["messages"] + [{"role": "assistant", "content": rec["text"]},
                                                   {"role": "user", "content": q}]
                body = dict(item["body"], messages=msgs, max_tokens=n, min_tokens=n)
                recs.append(dict(await stream_one(c, url, body), kind="chat8_followup"))
            return recs

        got = await asyncio.gather(*(one(it) for it in items))
        return [r for rs in got for r in rs] + [{"t0": t0}]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarise(recs: list[dict], t0: float) -> dict:
    ok = [r for r in recs if r["status"] == 200 and r["done"] is not None]
    end = max((r["done"] for r in ok), default=t0)
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    follow = [r["ttft"] for r in ok if r["kind"] == "chat8_followup" and r["ttft"] is not None]
    return {"requests": len(recs), "completed": len(ok), "failed": len(recs) - len(ok),
            "output_tokens": tokens, "wall_s": end - t0, "output_tok_s": tokens / (end - t0) if end > t0 else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(gaps, 50),
            "itl_p99_s": pct(gaps, 99), "followup_ttft_p50_s": pct(follow, 50),
            "followup_cached_tokens_mean": (sum(r["cached_tokens"] for r in ok if r["kind"] == "chat8_followup")
                                            / max(1, sum(r["kind"] == "chat8_followup" for r in ok))),
            "by_kind": {k: sum(r["kind"] == k for r in ok) for k in list(MIX) + ["chat8_followup"]},
            "errors": [r.get("error") for r in recs if r["status"] != 200][:5]}


# -- the three cases -----------------------------------------------------------------------------------------

async def short_during_long(url: str, long_tokens: int) -> dict:
    long_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
                 "max_tokens": long_tokens, "min_tokens": long_tokens, "stream": True}
    short_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                  "min_tokens": 2, "stream": True}
    async with httpx.AsyncClient(timeout=600) as c:
        # the short request alone first: "its own time"
        alone = await stream_one(c, url, short_body)
        started = asyncio.Event()
        t_long = time.monotonic()

        async def long() -> dict:
            rec = {"done": None}
            try:
                async with c.stream("POST", url + "/v1/chat/completions", json=long_body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and '"content":' in line and '"content": ""' not in line:
                            started.set()  # the answer is streaming (its first text)
            finally:
                started.set()  # (a model whose tokens print nothing: do not wait forever)
            rec["done"] = time.monotonic()
            return rec

        task = asyncio.ensure_future(long())
        await started.wait()
        sent = time.monotonic()
        short = await stream_one(c, url, short_body)
        lg = await task
    return {"short_alone_s": alone["done"] - alone["sent"], "short_during_long_s": short["done"] - sent,
            "long_total_s": lg["done"] - t_long, "long_left_when_short_sent_s": lg["done"] - sent,
            "short_finished_first": short["done"] < lg["done"]}


async def stream_response(c: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed Responses API request: TTFT (first output_text.delta), its id, usage, text."""
    t0 = time.monotonic()
    rec = {"ttft": None, "id": None, "text": "", "cached_tokens": 0, "input_tokens": 0, "status": None}
    async with c.stream("POST", url + "/v1/responses", json=body) as r:
        rec["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"/v1/responses: {r.status_code} {r.text[:200]}")
        text = []
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "response.output_text.delta" and ev["delta"]:
                if rec["ttft"] is None:
                    rec["ttft"] = time.monotonic() - t0
                text.append(ev["delta"])
            elif ev["type"] in ("response.completed", "response.incomplete"):
                resp = ev["response"]
                rec["id"], u = resp["id"], resp["usage"]
                rec["cached_tokens"] = u["input_tokens_details"]["cached_tokens"]
                rec["input_tokens"], rec["usage"] = u["input_tokens"], u
            elif ev["type"] == "error":
                raise RuntimeError(f"/v1/responses: {ev}")
        rec["text"] = "".join(text)
    return rec


async def followup_case(url: str, images: list[str], answers: list[int], n2: int, images_resp: list[str] | None = None,
                        chat: bool = True) -> dict:
    """The follow-up turn of a chat about 8 images, on two routes: chat completions (stateless: the client
    sends the history's text back, the server tokenizes it again) and, with `images_resp` (other images, so its
    first turn is cold too), the Responses API with previous_response_id (stateful: the stored answer's exact
    ids, serve/responses.py). `answers`: the lengths of the answered turns before the follow-up (the history);
    the first asks about the images, later ones about one picture each. `chat=False`: the Responses route only."""
    question, follow = "Describe these eight pictures one by one.", "Which of them is the brightest?"
    asks = [question] + [f"Tell me more about picture {k + 1}." for k in range(1, len(answers))]
    out: dict = {"answers": list(answers), "followup_tokens": n2}
    async with httpx.AsyncClient(timeout=1800) as c:
        if chat:
            msgs: list[dict] = []
            for k, (ask, n) in enumerate(zip(asks, answers)):
                msgs.append({"role": "user", "content": image_parts(images, ask) if k == 0 else ask})
                r = await stream_one(c, url, {"model": MODEL_NAME, "messages": msgs, "max_tokens": n, "min_tokens": n,
                                              "stream": True, "stream_options": {"include_usage": True}})
                if r["status"] != 200:
                    raise RuntimeError(f"chat turn {k + 1}: {r.get('error')}")
                out.setdefault("turn1_ttft_s", r["ttft"])
                msgs.append({"role": "assistant", "content": r["text"]})
                history = r["usage"]["prompt_tokens"] + r["tokens"]  # the last turn's prompt + its answer
            r2 = await stream_one(c, url, {"model": MODEL_NAME, "messages": msgs + [{"role": "user", "content": follow}],
                                           "max_tokens": n2, "min_tokens": n2, "stream": True,
                                           "stream_options": {"include_usage": True}})
            out.update(followup_ttft_s=r2["ttft"], followup_cached_tokens=r2["cached_tokens"],
                       followup_usage=r2.get("usage"), followup_history_tokens=history)
        if images_resp is not None:
            prev = None
            for k, (ask, n) in enumerate(zip(asks + [follow], answers + [n2])):
                body = {"model": MODEL_NAME, "stream": True, "max_output_tokens": n, "min_tokens": n, "input": ask}
                if k == 0:
                    body["input"] = [{"role": "user", "content": [{"type": "input_image", "image_url": u}
                                                                  for u in images_resp] +
                                      [{"type": "input_text", "text": ask}]}]
                else:
                    body["previous_response_id"] = prev
                s = await stream_response(c, url, body)
                prev = s["id"]
                if k < len(answers):  # an answered turn of the history: its prompt + its answer
                    history = s["input_tokens"] + s["usage"]["output_tokens"]
                if k == 0:
                    out["responses_turn1_ttft_s"] = s["ttft"]
            out.update(responses_followup_ttft_s=s["ttft"], responses_followup_cached_tokens=s["cached_tokens"],
                       responses_followup_input_tokens=s["input_tokens"], responses_followup_usage=s["usage"],
                       responses_followup_history_tokens=history)
    return out


def kv_table(a: argparse.Namespace) -> list[dict]:
    """K/V bytes per request in one mixed batch: continuous (its own blocks) vs dynamic (a padded row)."""
    import torch

    from hyperowl.batching import ContinuousEngine
    from hyperowl.engine import Engine, Request, SamplingParams
    from hyperowl.families import family_of

    torch.set_num_threads(a.threads)
    pipe = build_model(a)
    model = pipe.model
    cfg = model.config
    t, hdim = family_of(cfg).feature_tokens(cfg), cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    sizes = [("text, 40 tokens", 40, 0), ("text, 400 tokens", 400, 0), ("1 image", 40, 1), ("8 images", 40, 8),
             (f"{a.frames}-frame video", 40, a.frames)]
    reqs = []
    for _, n_tok, n_img in sizes:
        ids = torch.randint(10, 500, (n_tok,), generator=g)
        pos = torch.sort(torch.randperm(n_tok - 8, generator=g)[:n_img])[0] + 4 if n_img else None
        emb = torch.randn(n_img, t, hdim, generator=g, dtype=model.dtype) * 0.02 if n_img else None
        reqs.append(Request(ids, image_embeds=emb, image_positions=pos, params=SamplingParams(max_new_tokens=2)))
    eng = ContinuousEngine(model, kv_cache_bytes=int((a.kv_cache_gb or 1.0) * 2**30))
    infos = {}
    for i, r in enumerate(reqs):
        eng.add(i, r)
    while eng.has_work():
        for ev in eng.step():
            if ev.token is not None and ev.request_id not in infos:  # prefill done: the request's blocks
                infos[ev.request_id] = eng.request_info(ev.request_id)
    # dynamic: one left-padded batch, every row as long as the longest prompt and with the most images
    engine = Engine(model)
    batch = engine._collate(reqs)
    cache = model.new_cache(batch["input_ids"].shape[1] + 2)
    with torch.no_grad():
        model(**batch, cache=cache, last_logits_only=True)
    per_row = cache.nbytes() / len(reqs)
    return [{"request": name, "prompt_tokens": n_tok, "images": n_img,
             "continuous_kv_bytes": infos[i]["kv_bytes"], "dynamic_kv_bytes_per_row": per_row}
            for i, (name, n_tok, n_img) in enumerate(sizes)]


# -- output --------------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sched, style in zip(SCHEDULERS, ("o--", "s-")):
        pts = [r for r in rows if r["scheduler"] == sched]
        x = [r["output_tok_s"] for r in pts]
        for ax, key, label in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "inter-token latency")):
            for q, alpha in (("p50", 0.5), ("p99", 1.0)):
                ax.plot(x, [r[f"{key}_{q}_s"] for r in pts], style, alpha=alpha, label=f"{sched} {q}")
                for xx, r in zip(x, pts):
                    if q == "p99":
                        ax.annotate(f"{r['rate']:g}/s", (xx, r[f"{key}_{q}_s"]), fontsize=7)
            ax.set_xlabel("output tokens / s")
            ax.set_ylabel(f"{label} (s)")
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def plot_followup(rows: list[dict], path: Path, what: str) -> None:
    """Fresh vs reuse TTFT of the follow-up over its prompt's sequence rows (the Responses route's points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resp = sorted((r for r in rows if r["route"] == "responses"), key=lambda r: r["sequence_rows"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [r["sequence_rows"] for r in resp]
    ax.plot(x, [r["fresh_ttft_s"] for r in resp], "o--", label="fresh prefill (no prefix cache)")
    ax.plot(x, [r["reuse_ttft_s"] for r in resp], "s-", label="prefix reuse (previous_response_id)")
    for xx, r in zip(x, resp):
        turns = "+".join(map(str, r["answers"]))
        ax.annotate(f"{r['fresh_over_reuse']:.1f}x\n(answers {turns})", (xx, r["fresh_ttft_s"]), fontsize=7,
                    xytext=(4, -18), textcoords="offset points")
    ax.set_xlabel("follow-up prompt: sequence rows (history + new turn)")
    ax.set_ylabel("follow-up TTFT (s)")
    ax.set_title(f"follow-up of a chat about 8 images\n{what}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def followup_sweep(a: argparse.Namespace, out: Path) -> None:
    """`--followup-only`: the follow-up case alone, at each `--history` point (the answer lengths of the turns
    before the follow-up), on a continuous server (prefix reuse) and one without the prefix cache (the history
    prefilled fresh; its feature cache keeps the images, so the tower is not rerun on either). The Responses
    route at every point, chat completions at the first. Table, JSON, PNG (TTFT over the follow-up's prompt)."""
    names = ("continuous_no_prefix_cache", "continuous")
    servers, urls = {}, {}
    points = [[int(n) for n in h.split(",")] for h in a.history]
    rows_in_text = a.shape == "owl2"  # Owl2's images are rows of the text sequence (65 each); Owl3's are not
    rnd, rows = random.Random(a.seed + 99), []
    try:
        for name in names:
            servers[name], urls[name] = start_server(a, "continuous", out.with_suffix(f".{name}.log"),
                                                     prefix_cache=name == "continuous")
        for name, proc in servers.items():
            wait_ready(proc, urls[name], name, out.with_suffix(f".{name}.log"))
        block = httpx.get(urls["continuous"] + "/health", timeout=10).json()["scheduler"]["kv_cache"]["block_size"]
        for i, answers in enumerate(points):
            got = {}
            for name in names:  # side by side, point by point: a change of the machine's load touches both
                imgs, imgs_resp = ([png_url(rnd, a.image_px) for _ in range(8)] for _ in range(2))
                got[name] = asyncio.run(followup_case(urls[name], imgs, answers, a.followup_tokens, imgs_resp,
                                                      chat=i == 0))
            load = os.getloadavg()
            for route, pre in (("chat", ""), ("responses", "responses_")):
                if f"{pre}followup_ttft_s" not in got["continuous"]:
                    continue
                u = got["continuous"][f"{pre}followup_usage"]
                d = u.get("prompt_tokens_details") or u.get("input_tokens_details")
                prompt = u.get("prompt_tokens", u.get("input_tokens"))
                per_image = d["visual_tokens"] // max(1, d["image_tensors"])
                seq = prompt + d["image_tensors"] * (per_image - 1) if rows_in_text else prompt
                cached_rows = d["cached_tokens"] + d["cached_image_tensors"] * (per_image - 1) if rows_in_text \
                    else d["cached_tokens"]
                history = got["continuous"][f"{pre}followup_history_tokens"]
                fresh, reuse = got[names[0]][f"{pre}followup_ttft_s"], got["continuous"][f"{pre}followup_ttft_s"]
                rows.append({"answers": answers, "route": route, "prompt_tokens": prompt, "sequence_rows": seq,
                             "cached_tokens": d["cached_tokens"], "cached_image_tensors": d["cached_image_tensors"],
                             "cached_rows": cached_rows, "history_tokens": history, "new_turn_tokens": prompt - history,
                             "history_tokens_not_reused": history - d["cached_tokens"],
                             "fresh_ttft_s": fresh, "reuse_ttft_s": reuse,
                             "fresh_over_reuse": fresh / reuse if fresh and reuse else None, "loadavg": load,
                             "raw": got})
                print(f"history {','.join(map(str, answers)):>9} {route:<10} prompt {prompt:>5} tokens ({seq} rows), "
                      f"cached {d['cached_tokens']:>5} ({cached_rows} rows; history {history}): fresh {fmt(fresh)} s, reuse {fmt(reuse)} s, "
                      f"{fmt(rows[-1]['fresh_over_reuse'], '.1f')}x (loadavg {load[0]:.2f})", flush=True)
    finally:
        stop_servers(servers)
    model = model_name(a)
    out.write_text(json.dumps({"config": {"model": model, "device": a.device, "dtype": a.dtype, "threads": a.threads,
                                          "history": points, "followup_tokens": a.followup_tokens, "block_size": block,
                                          "cpus": os.cpu_count()}, "followup": rows}, indent=2))
    if sum(r["route"] == "responses" for r in rows) > 1:
        plot_followup(rows, out.with_suffix(".png"), f"{model}, {a.device} {a.dtype}")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--shape", default="", choices=["", "a", "owl2"],
                    help="a: bench_vs_llava.py's shape a; owl2: an Owl2 of shape a's width (build_owl2; random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server (a core stays with the client)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="arrivals per second")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    ap.add_argument("--frames", type=int, default=32, help="frames of the video requests")
    ap.add_argument("--image-px", type=int, default=64, help="side of the (random) images sent")
    ap.add_argument("--max-answer", type=int, default=128, help="answer length cap")
    ap.add_argument("--long-tokens", type=int, default=400, help="the long answer of the short-during-long case")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="continuous server's K/V budget (default: its own)")
    ap.add_argument("--max-running", type=int, default=64, help="continuous server's --max-running")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests (< 60 s)")
    ap.add_argument("--cases-only", action="store_true", help="skip the load sweep: the three cases only")
    ap.add_argument("--followup-only", action="store_true",
                    help="the follow-up case alone at each --history point, reuse vs fresh (followup_sweep)")
    ap.add_argument("--history", nargs="+", default=["32"],
                    help="--followup-only: answer lengths of the turns before the follow-up, e.g. 32 256 32,256")
    ap.add_argument("--followup-tokens", type=int, default=8, help="--followup-only: the follow-up's answer length")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_load[_a].json; PNG beside)")
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batching", default="continuous", help=argparse.SUPPRESS)
    ap.add_argument("--no-prefix-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_only:
        return serve_only(a)
    if a.smoke:
        a.rates, a.duration, a.frames, a.max_answer, a.long_tokens = [2.0, 6.0], 2.5, 8, 8, 60
    out = Path(a.out or f"bench/results/serve_load{'_' + a.shape if a.shape else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.followup_only:
        return followup_sweep(a, out.with_name(out.stem + "_followup.json") if not a.out else out)

    servers, samplers, urls = {}, {}, {}
    t_bench = time.monotonic()
    try:
        names = SCHEDULERS if a.smoke else (*SCHEDULERS, "continuous_no_prefix_cache")
        for name in names:  # they load their models at once
            sched = name.split("_")[0]
            servers[name], urls[name] = start_server(a, sched, out.with_suffix(f".{name}.log"),
                                                     prefix_cache=name != "continuous_no_prefix_cache")
        for name, proc in servers.items():
            wait_ready(proc, urls[name], name, out.with_suffix(f".{name}.log"))
        for sched in SCHEDULERS:
            samplers[sched] = RssSampler(servers[sched].pid)
        print(f"[{time.monotonic() - t_bench:.0f} s] servers ready", flush=True)
        rows = []
        for i, rate in enumerate([] if a.cases_only else a.rates):
            items = workload(rate, a.duration, a.seed * 1000 + i, a)
            print(f"[{time.monotonic() - t_bench:.0f} s] rate {rate:g}/s: {len(items)} requests", flush=True)
            for sched in SCHEDULERS:
                t_start = time.monotonic()
                recs = asyncio.run(run_load(urls[sched], items, a.timeout))
                t0 = recs.pop()["t0"]
                s = summarise(recs, t0)
                s.update(scheduler=sched, rate=rate, peak_rss_mib=samplers[sched].peak(t_start, time.monotonic()),
                         health=httpx.get(urls[sched] + "/health", timeout=10).json()["scheduler"])
                rows.append(s)
                print(f"rate {rate:g}/s {sched:<10} completed {s['completed']}/{s['requests']} "
                      f"{s['output_tok_s']:.1f} tok/s, TTFT p50 {fmt(s['ttft_p50_s'])} p99 {fmt(s['ttft_p99_s'])} s",
                      flush=True)
        print(f"[{time.monotonic() - t_bench:.0f} s] the three cases", flush=True)
        short = {sched: asyncio.run(short_during_long(urls[sched], a.long_tokens)) for sched in SCHEDULERS}
        rnd = random.Random(a.seed + 99)
        follow = {}
        for name, url in urls.items():
            imgs = [png_url(rnd, a.image_px) for _ in range(8)]  # new images for each server: a cold first turn
            imgs_resp = [png_url(rnd, a.image_px) for _ in range(8)]
            follow[name] = asyncio.run(followup_case(url, imgs, [32 if not a.smoke else 6], 8 if not a.smoke else 3,
                                                     imgs_resp))
    finally:
        for s in samplers.values():
            s.stop.set()
        stop_servers(servers)
    kv = kv_table(a)

    model = model_name(a)
    print(f"\nbench_serve_load: {model} on {a.device} ({a.dtype}), {a.threads} torch thread(s) per server, "
          f"{os.cpu_count()} CPUs (shared with other work: compare side by side only)\n")
    print(f"{'rate/s':>7} {'scheduler':<11}{'done':>6}{'fail':>5}{'tok/s':>8}{'TTFT p50':>9}{'p99':>8}"
          f"{'ITL p50':>9}{'p99':>8}{'follow-up TTFT':>15}{'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['rate']:>7g} {r['scheduler']:<11}{r['completed']:>6}{r['failed']:>5}{r['output_tok_s']:>8.1f}"
              f"{fmt(r['ttft_p50_s']):>9}{fmt(r['ttft_p99_s']):>8}{fmt(r['itl_p50_s']):>9}{fmt(r['itl_p99_s']):>8}"
              f"{fmt(r['followup_ttft_p50_s']):>15}{r['peak_rss_mib']:>13.0f}")
    print(f"\nshort request (2 tokens) sent while a {a.long_tokens}-token answer streams:")
    for sched, s in short.items():
        print(f"  {sched:<11} alone {s['short_alone_s']:.3f} s, during the long answer {s['short_during_long_s']:.3f} s "
              f"(the long answer had {s['long_left_when_short_sent_s']:.2f} s left; finished first: "
              f"{s['short_finished_first']})")
    print(f"\nfollow-up turn of a chat about 8 images (TTFT; loadavg {os.getloadavg()[0]:.2f}):")
    print(f"  {'server':<27}{'route':<26}{'turn 1 s':>9}{'follow-up s':>12}{'cached tokens':>14}")
    for name, f in follow.items():
        print(f"  {name:<27}{'chat (text re-tokenized)':<26}{fmt(f['turn1_ttft_s']):>9}{fmt(f['followup_ttft_s']):>12}"
              f"{f['followup_cached_tokens']:>14}")
        if "responses_followup_ttft_s" in f:
            print(f"  {'':<27}{'responses (exact ids)':<26}{fmt(f['responses_turn1_ttft_s']):>9}"
                  f"{fmt(f['responses_followup_ttft_s']):>12}{f['responses_followup_cached_tokens']:>14}")
    ratios = {}
    for route, key in (("chat", "followup_ttft_s"), ("responses", "responses_followup_ttft_s")):
        fresh = follow.get("continuous_no_prefix_cache", follow["dynamic"]).get(key)  # smoke: no such server
        reuse = follow["continuous"].get(key)
        ratios[route] = fresh / reuse if fresh and reuse else None
        print(f"  {route}: fresh prefill / prefix reuse: {fmt(ratios[route], '.1f')}x")
    ratio = ratios["chat"]
    print("\nK/V bytes per request in one mixed batch:")
    print(f"  {'request':<20}{'tokens':>7}{'images':>7}{'continuous':>14}{'dynamic (padded row)':>22}")
    for r in kv:
        print(f"  {r['request']:<20}{r['prompt_tokens']:>7}{r['images']:>7}{r['continuous_kv_bytes'] / 2**20:>12.2f}MB"
              f"{r['dynamic_kv_bytes_per_row'] / 2**20:>20.2f}MB")

    result = {"config": {"model": model, "device": a.device, "dtype": a.dtype, "threads": a.threads,
                         "rates": a.rates, "duration_s": a.duration, "mix": MIX, "frames": a.frames,
                         "image_px": a.image_px, "max_answer": a.max_answer, "kv_cache_gb": a.kv_cache_gb,
                         "max_running": a.max_running,
                         "seed": a.seed, "smoke": a.smoke, "machine": platform.machine(), "cpus": os.cpu_count()},
              "load": rows, "short_during_long": short, "followup": follow, "followup_fresh_over_reuse": ratio,
              "followup_fresh_over_reuse_responses": ratios["responses"], "loadavg": os.getloadavg(),
              "kv_bytes": kv}
    out.write_text(json.dumps(result, indent=2))
    if rows:
        plot(rows, out.with_suffix(".png"), f"bench_serve_load: {model} ({a.device}), open-loop Poisson, mixed workload")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
