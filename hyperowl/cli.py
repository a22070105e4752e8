"""The `hyperowl` command: subcommands as plain functions over parsed arguments.

Design note: user errors (HyperowlError) print one line `hyperowl: error: ...` and exit 2; `--debug` shows
the traceback instead. Model loading is deferred until arguments are valid, so typos fail fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import HyperowlError, InputError
from .limits import DEFAULT_FRAMES, MAX_FRAMES, MAX_MEDIA_BYTES, SEED_RANGE

log = logging.getLogger("hyperowl")

HELP_INTERACTIVE = """Type a message and press Enter. Commands:
  /image PATH   attach an image to your next message      /video PATH   attach a video
  /reset        forget the conversation                   /quit         leave (or Ctrl-D)"""


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _with_placeholders(text: str, n_images: int, n_videos: int) -> str:
    """Put one placeholder per attached file in front of the text, unless the user placed them."""
    if "<|image|>" in text or "<|video|>" in text:
        return text
    return "<|image|>" * n_images + "<|video|>" * n_videos + text


def _check_files(paths: Sequence[str], what: str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"{what} '{p}': no such file")


def _check_media(kind: str, path: str, args: argparse.Namespace) -> None:
    """Read an attachment now, the way the answer will (an image decoded within the pixel limit, a video's
    container probed for frames), so a bad file is an error naming it before the model runs on it."""
    _check_files([path], kind)
    if kind == "image":
        from .processing.images import load_image

        load_image(path).close()
    else:
        from .processing.video import probe_video

        probe_video(path, max_frames=args.frames, fps=args.fps)


def _check_listen(host: str, port: int) -> None:
    """`serve --host/--port`: a port number, a host that resolves, an address free to listen on; checked by
    binding once before the model loads (uvicorn's own failures come after it, as tracebacks)."""
    import socket

    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"--host '{host}': not an address of this machine ({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: only a live listener blocks
        try:
            sock.bind(addr)
        except OSError as e:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                             "pick another port or host") from None


def _answer(model, messages, images, videos, args) -> str:
    out = []
    for piece in model.chat(messages, images=images, videos=videos, stream=True, max_frames=args.frames,
                            fps=args.fps, cut=False if args.no_cut else None, system=args.system, **_sampling(args)):
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def cmd_chat(args: argparse.Namespace) -> int:
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            _check_media(kind, path, args)
    import hyperowl

    owl = hyperowl.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    if owl.processor is None:
        raise InputError(f"model '{args.model or owl.checkpoint_dir}': no tokenizer.json in the checkpoint; chat needs one")
    if args.prompt:
        text = _with_placeholders(" ".join(args.prompt), len(args.image), len(args.video))
        _answer(owl, [{"role": "user", "content": text}], list(args.image), list(args.video), args)
        return 0
    return _interactive(owl, args)


def _drop_named(media: list[str], pending: int, error: str) -> list[str]:
    """Remove from `media`'s last `pending` entries (attached, not yet in a message) those that `error` names;
    returns them."""
    named = [p for p in media[len(media) - pending:] if f"'{p}'" in error]
    for p in named:
        del media[len(media) - 1 - media[::-1].index(p)]  # the last (pending) copy of it
    return named


def _interactive(model, args: argparse.Namespace) -> int:
    messages: list[dict] = []
    images, videos = list(args.image), list(args.video)  # all media of the conversation, in order
    pending_img, pending_vid = len(images), len(videos)  # attached but not yet placed in a message
    print(HELP_INTERACTIVE, file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            messages, images, videos, pending_img, pending_vid = [], [], [], 0, 0
            continue
        if cmd in ("/image", "/video"):
            kind = cmd[1:]
            try:
                _check_media(kind, rest.strip(), args)
            except InputError as e:
                print(f"hyperowl: error: {e}", file=sys.stderr)
                continue
            (images if kind == "image" else videos).append(rest.strip())
            pending_img += kind == "image"
            pending_vid += kind == "video"
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd}\n{HELP_INTERACTIVE}", file=sys.stderr)
            continue
        turn = {"role": "user", "content": _with_placeholders(line, pending_img, pending_vid)}
        sys.stdout.write("owl> ")
        try:
            reply = _answer(model, messages + [turn], images, videos, args)
        except InputError as e:  # a bad file or message loses nothing: the conversation goes on
            # An attachment the error names (it failed while the answer read it) is dropped, or every later
            # message would fail on it again; the conversation and the other attachments are kept.
            bad_img, bad_vid = _drop_named(images, pending_img, str(e)), _drop_named(videos, pending_vid, str(e))
            pending_img, pending_vid = pending_img - len(bad_img), pending_vid - len(bad_vid)
            dropped = bad_img + bad_vid
            note = f" (dropped {', '.join(dropped)}; the conversation goes on)" if dropped else ""
            print(f"\nhyperowl: error: {e}{note}", file=sys.stderr)
            continue
        messages += [turn, {"role": "assistant", "content": reply}]
        pending_img = pending_vid = 0


def cmd_info(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from .checkpoint import read_config, resolve, safetensors_files, shard_keys
    from .families import family_for_checkpoint

    d = resolve(args.path)
    raw = read_config(d)
    files = safetensors_files(d)
    keys = shard_keys(files)
    n_params, dtypes = 0, set()
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                n = 1
                for dim in s.get_shape():
                    n *= dim
                n_params += n
                dtypes.add(s.get_dtype())
    family = family_for_checkpoint(raw, keys, where=str(d / "config.json"))
    info = {"path": str(d), "model_type": raw.get("model_type"), "family": family.name, "model": family.description,
            **family.config_from_hf(raw, where=str(d / "config.json")).summary()}
    info.update({"parameters": n_params, "parameters_human": f"{n_params / 1e9:.3f}B" if n_params > 1e8 else f"{n_params / 1e6:.2f}M",
                 "stored_dtype": ", ".join(sorted(dtypes)), "shards": len(files),
                 "tokenizer": (d / "tokenizer.json").exists()})
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`hyperowl convert SRC OUT --trust-pickle`: pickle weights -> safetensors, once, only when trusted."""
    from .checkpoint import convert_pickle_checkpoint

    if not args.trust_pickle:
        raise InputError(f"'{args.src}': pickle files can run arbitrary code when loaded; hyperowl converts them only "
                         "with --trust-pickle (use it only for checkpoints from a source you trust)")
    print(convert_pickle_checkpoint(args.src, args.out, trust_pickle=True))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.recipe import Recipe
    from .train.trainer import train

    recipe = Recipe.from_yaml(args.recipe)
    if args.output:
        recipe.output = args.output
    if args.max_steps:
        if recipe.phases:
            raise InputError(f"recipe '{args.recipe}' has phases: set optim.max_steps in each phase, not --max-steps")
        recipe.optim.max_steps = args.max_steps
    if not args.debug:  # the start banner (parts, resume point, effective batch) without the debug noise
        logging.getLogger("hyperowl.train.banner").setLevel(logging.INFO)
    out = train(recipe, resume=args.resume, stop_after=args.stop_after, fsdp=args.fsdp, overwrite=args.overwrite)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"trained model: {out / 'final'}  (log: {out / 'log.jsonl'}, plot: {out / 'loss.png'})", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.interop import export_peft

    if not args.peft:
        raise InputError("export: say what to export: --peft (a LoRA checkpoint's adapters in PEFT format)")
    print(export_peft(args.checkpoint, args.out))
    return 0


def cmd_plot_log(args: argparse.Namespace) -> int:
    from .train.plot import plot_log

    out = args.out or str(Path(args.log).with_suffix(".png"))
    print(plot_log(args.log, out))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .train.tokenizer import with_media_tokens
    from .train.upgrade import upgrade

    try:
        layers = [int(x) for x in args.hyper_layers.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--hyper-layers '{args.hyper_layers}': expected 1-based layer numbers like 1,9,17,25") from None
    up = upgrade(args.text_llm, args.vision, layers, variant=args.variant)
    out = save_checkpoint(up.model, args.out)
    with_media_tokens(up.text_dir, out / "tokenizer.json")
    print(out)
    return 0


def cmd_pretrain_vision(args: argparse.Namespace) -> int:
    import torch

    from .config import PRESETS
    from .train.vision_pretrain import pretrain_vision

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = pretrain_vision(PRESETS[args.preset].vision, args.out, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, warmup=args.warmup, seed=args.seed, exclude=args.exclude,
                              eval_every=args.eval_every, pairs=args.pair_labels, drawn=args.drawn,
                              free=args.free)
    acc = summary["accuracy"]
    print(f"{args.out}: held-out per-object accuracy " + ", ".join(f"{h} {acc[h + '_object']:.3f}" for h in
                                                                  ("kind", "colour", "size", "cell", "pair")
                                                                  if h + "_object" in acc)
          + f"  ({summary['seconds']:.0f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`hyperowl serve`: the OpenAI-compatible API and the web chat page (hyperowl.serve)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("serving needs fastapi and uvicorn: pip install 'hyperowl[serve]'") from None
    if args.allowed_media_dir is not None and not Path(args.allowed_media_dir).is_dir():
        raise InputError(f"--allowed-media-dir '{args.allowed_media_dir}': no such directory")
    for name in ("max_batch_size", "max_queue", "max_images", "frames"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_padded_images < 0:
        raise InputError("--max-padded-images must be >= 0")
    for name in ("max_running", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.live_session_idle_s >= 0:
        raise InputError(f"--live-session-idle-s {args.live_session_idle_s}: must be >= 0 (seconds; 0 = never)")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise InputError(f"--kv-cache-gb {args.kv_cache_gb}: must be > 0 (GiB of K/V cache)")
    _check_listen(args.host, args.port)
    import hyperowl
    from .serve import ServeConfig, serve
    from .serve.url_policy import UrlPolicy

    url_policy = UrlPolicy.from_options(args.allowed_media_domains, args.allow_private_media_urls)  # before loading

    import torch

    model = hyperowl.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    if args.threads or model.device.type == "cpu":
        # On CPU, leave one core to the event loop: torch's spinning worker threads on every core starve it
        # and a batch of 8 streams ran >10x slower in bench/bench_serve.py on a 2-core machine.
        torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    if model.processor is None:
        raise InputError(f"model '{args.model}': no tokenizer.json in the checkpoint; serving needs one")
    config = ServeConfig(
        model_name=args.served_model_name or Path(str(args.model or hyperowl.default_model_dir()).rstrip("/")).name,
        api_key=args.api_key,
        allowed_media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None,
        media_url_policy=url_policy,
        allow_remote_media=not args.no_remote_media, max_images=args.max_images, max_videos=args.max_videos,
        max_frames=args.frames, fps=args.fps, cut=False if args.no_cut else None, max_media_bytes=int(args.max_media_mb * 2**20),
        max_body_bytes=int(args.max_body_mb * 2**20), max_queue=args.max_queue, max_batch_size=args.max_batch_size,
        max_padded_images=args.max_padded_images, batch_window_ms=args.batch_window_ms, feature_cache_mb=args.feature_cache_mb,
        default_max_tokens=args.default_max_tokens, batching=args.batching, kv_cache_gb=args.kv_cache_gb,
        max_running=args.max_running, prefill_chunk=args.prefill_chunk,
        live_session_idle_s=args.live_session_idle_s)
    print(f"hyperowl: serving {config.model_name} on http://{args.host}:{args.port} (chat page at /)", file=sys.stderr)
    serve(model, model.processor, config, host=args.host, port=args.port, log_level="debug" if args.debug else "info")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    from .eval import harness

    # Read and check the data (or generate a synthetic set) before loading the model: bad input fails fast.
    if args.ood is not None:
        from .eval.runner import ood_path

        if args.task != "exact":
            raise InputError("--ood: only with --task exact (the test split and the ood set are both exact match)")
        ood_path(args.ood)  # fails fast, before the model loads
    harness.check_scoring_for(args.task, args.scoring, args.prompt_style)
    plan = harness.prepare(args.task, args.data, args.out, limit=args.limit, frames=args.frames,
                           distractors=args.distractors, pool=args.pool, seed=args.seed, cache_dir=args.cache_dir,
                           circular=not args.no_circular, annotations=args.annotations, image_dir=args.image_dir,
                           video_dir=args.video_dir)
    import hyperowl

    device = args.device
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if plan.offline:  # a prediction file: scored from its answers, no model loaded
        model = None
    else:
        model = hyperowl.load(args.model, dtype=args.dtype, device=device, quantize=args.quantize)
        if model.processor is None:
            raise InputError(f"model '{args.model}': no tokenizer.json in the checkpoint; eval needs one")
    s = harness.run(model, plan, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, variants=args.variants, style=args.prompt_style, scoring=args.scoring)
    o = None
    if args.ood is not None:  # beside the test split: summary.json's "ood" block (every rank takes part)
        from .eval.runner import add_ood

        o = add_ood(model, args.ood, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "results" in s:  # the distractor sweep
        from .eval.distractor import format_table

        print(format_table(s))
        print(f"written: {Path(args.out) / 'distractor.json'}" + (f", {s['plot']}" if s.get("plot") else ""))
        return 0
    rows = s["groups"] if args.task == "exact" else s["categories"]
    name = "group" if args.task == "exact" else "category"
    width = max([len(k) for k in rows] + [len(name)])
    print(f"{name:<{width}}  {'n':>5}  accuracy")
    for k, v in rows.items():
        print(f"{k:<{width}}  {v['n']:>5}  {v['accuracy']:.3f}")
    print(f"{'all':<{width}}  {s['n']:>5}  {s['accuracy']:.3f}")
    if o is not None:
        print(f"\nood ({o['data']})")
        for k, v in o["categories"].items():
            print(f"{k:<{width}}  {v['n']:>5}  {v['accuracy']:.3f}")
        print(f"{'ood all':<{width}}  {o['n']:>5}  {o['accuracy']:.3f}")
    for field, table in s.get("breakdown", {}).items():  # e.g. Video-MME's durations
        w = max([len(k) for k in table] + [len(field)])
        print(f"\n{field:<{w}}  {'n':>5}  accuracy")
        for k, v in table.items():
            print(f"{k:<{w}}  {v['n']:>5}  {v['accuracy']:.3f}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """`hyperowl batch INPUT --out OUTPUT`: answer every record (hyperowl.batch.run), print the summary."""
    import os

    from . import batch

    s = batch.run(args.input, args.out, model=args.model, batch_size=args.batch_size, max_frames=args.frames,
                  fps=args.fps, cut=False if args.no_cut else None, system=args.system, dtype=args.dtype,
                  device=args.device, quantize=args.quantize, feature_cache_mb=args.feature_cache_mb, ray=args.ray,
                  replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                  json_schema=_json_schema(args.json_schema), **_sampling(args))
    if int(os.environ.get("RANK", "0")) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_reason"].items()))
        print(f"{s['output']}: {s['answered']} answered, {s['failed']} failed" + (f" ({reasons})" if reasons else "")
              + f", {s['skipped_already_done']} already done" + (f", {s['duplicates_not_written']} duplicate ids not "
                                                                  "written" if s["duplicates_not_written"] else ""))
    return 0


def _json_schema(path: str | None):
    """--json-schema FILE: the schema object it holds ("json_object" for any JSON object); None when not given."""
    if path is None or path == "json_object":
        return path
    import json

    try:
        schema = json.loads(Path(path).read_text())
    except OSError as e:
        raise InputError(f"--json-schema '{path}': cannot read it ({e.strerror}); give a JSON schema file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--json-schema '{path}': not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(schema, dict):
        raise InputError(f"--json-schema '{path}': must hold a JSON schema object")
    return schema


def cmd_data(args: argparse.Namespace) -> int:
    if args.rest and args.rest[0] == "ood":  # the out-of-distribution test set (issue 31)
        from .data.synthetic.ood import ood_main as main
    elif args.rest and args.rest[0] == "synth":
        from .data.synthetic import synth_main as main
    else:
        raise InputError("data: the subcommands are `synth` (hyperowl data synth --out DIR [--train N ...]) and "
                         "`ood` (hyperowl data ood --out DIR [--n 300 --seed 7])")
    try:
        return main(args.rest[1:])
    except OSError as e:  # an --out folder that cannot be made or written, an --exclude file that cannot be read
        raise InputError(f"data {args.rest[0]}: cannot use '{e.filename}' ({e.strerror}); give a folder you can "
                         "write to and files that exist") from None


_DTYPES = ["float32", "bfloat16", "float16"]


def parse_time(text: str) -> float:
    """'30', '30s', '1m30s', '2h', '1:30', '1:02:03' -> seconds."""
    import re

    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    if re.fullmatch(r"\d+(:\d{1,2}){1,2}(\.\d+)?", t):
        out = 0.0
        for part in t.split(":"):
            out = out * 60 + float(part)
        return out
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", t)
    if not t or not m:
        raise InputError(f"--at {text!r}: not a time; write e.g. 30s, 1m30s, 1:30 or 90")
    h, mi, se = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + se


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a video source live; answer questions typed at any time (stdin) or scripted with --ask/--at."""
    import queue
    import threading

    if len(args.ask) != len(args.at):
        raise InputError(f"--ask was given {len(args.ask)} times and --at {len(args.at)} times; give one --at per --ask")
    script = sorted(((parse_time(a), q) for q, a in zip(args.ask, args.at)), key=lambda x: x[0])
    if args.fps <= 0:
        raise InputError(f"--fps {args.fps}: must be a positive number of frames per second")
    import hyperowl
    from .processing.video import iter_stream, open_stream

    container = open_stream(args.source, args.stall_timeout)  # a bad source fails before the model loads
    owl = hyperowl.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    live = owl.live(system=args.system or "", memory_gb=args.memory_gb, **_sampling(args))
    tty = sys.stderr.isatty()
    questions: "queue.Queue[str]" = queue.Queue()
    if not script:  # questions typed at any time, read by a thread so the stream goes on meanwhile
        def read() -> None:
            for line in sys.stdin:
                if line.strip():
                    questions.put(line.strip())
        threading.Thread(target=read, daemon=True).start()
    now = 0.0

    def status() -> None:
        st = live.status()
        line = (f"[{now:7.1f}s] frames seen {st['frames_seen']}, kept {st['frames_kept']}, "
                f"memory {st['memory_bytes'] / 2**20:.1f} MiB")
        if tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()

    def answer(q: str, at: float) -> None:
        if tty:
            sys.stderr.write("\r\x1b[K")
        print(f"[{at:.1f}s] Q: {q}", flush=True)
        sys.stdout.write(f"[{at:.1f}s] A: ")
        for piece in live.ask(q, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    frames = iter_stream(args.source, args.fps, not args.fast, stall_timeout=args.stall_timeout, container=container)
    try:
        for t, image in frames:
            while script and script[0][0] < t - 1e-6:  # asked at T: every frame up to T is in
                answer(script.pop(0)[1], now)
            if not script and args.ask:
                break  # scripted and done: no need to follow the rest
            live.add_frames(image, timestamps=[t])
            now = t
            while not questions.empty():
                answer(questions.get(), now)
            status()
        else:
            if tty:
                sys.stderr.write("\n")
            print(f"hyperowl: {args.source} ended at {now:.1f}s", file=sys.stderr)
    except InputError as e:  # a stall or a broken stream: keep answering about what was seen
        print(f"\nhyperowl: {e}", file=sys.stderr)
    finally:
        frames.close()
    for _, q in script:  # the stream ended before their time
        answer(q, now)
    if not args.ask:  # interactive: questions until EOF
        try:
            while True:
                answer(questions.get(timeout=None if sys.stdin.isatty() else 0.5), now)
        except queue.Empty:
            pass
    st = live.status()
    print(f"hyperowl: watched {now:.1f}s: {st['frames_seen']} frames seen, {st['frames_kept']} kept, "
          f"{st['memory_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    live.close()
    return 0


def _watch_parser(sub) -> None:
    w = _subcommand(sub, "watch", cmd_watch, "follow a live video (file, camera, stream URL) and answer questions "
                    "about it at any time")
    w.add_argument("source", help="a video file, a camera (/dev/video0) or a stream URL (rtsp://, http(s)://)")
    w.add_argument("--fps", type=float, default=1.0, help="frames per second of stream time given to the model "
                   "(default 1)")
    w.add_argument("--fast", action="store_true", help="read a file as fast as it decodes, not at its own pace")
    w.add_argument("--memory-gb", type=float, default=None, help="ceiling on the session's K/V memory; older "
                   "frames are thinned to stay under it (docs/live.md)")
    w.add_argument("--ask", action="append", default=[], metavar="Q", help="a question to ask at --at (repeatable; "
                   "scripted: exits after the last one)")
    w.add_argument("--at", action="append", default=[], metavar="TIME", help="stream time of the matching --ask: "
                   "30s, 1m30s, 1:30")
    w.add_argument("--stall-timeout", type=float, default=10.0, help="seconds without data before a stream counts "
                   "as stalled (default 10)")
    w.add_argument("--system", default=None, help="system prompt")
    _model_options(w)
    _sampling_options(w)


def _debug_option(p: argparse.ArgumentParser) -> None:
    """`--debug` after the subcommand too; SUPPRESS: its absence must not override `hyperowl --debug CMD`."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def _subcommand(sub, name: str, func, help: str, **kw) -> argparse.ArgumentParser:
    """A subparser that runs `func`, with `--debug` accepted after the subcommand name too."""
    sp = sub.add_parser(name, help=help, **kw)
    sp.set_defaults(func=func)
    _debug_option(sp)
    return sp


def _model_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Which checkpoint and how it is loaded (chat, serve, eval); returns the group."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint directory or hub id, Owl3 or Owl2 (e.g. "
                   "mPLUG/mPLUG-Owl3-7B-241101); default: the embedded model in hyperowl/assets/owl3-synthetic")
    g.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="default: float32 on CPU, the checkpoint's dtype (else bfloat16) on GPU")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--quantize", default=None, choices=["int8"], help="int8 weight-only LLM linears (inference; "
                   "4x less LLM weight memory; see bench/bench_quantize.py for speed)")
    return g


def _media_options(p: argparse.ArgumentParser, files: bool) -> None:
    """How images and videos become visual tokens (chat, serve); files: also --image/--video (chat)."""
    g = p.add_argument_group("images and videos")
    if files:
        g.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
        g.add_argument("--video", action="append", default=[], metavar="PATH", help="a video (repeatable)")
    g.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help=f"max frames sampled per video (default %(default)s, at most {MAX_FRAMES})")
    g.add_argument("--fps", type=float, default=None, help="sample video frames at this rate (capped by --frames)")
    g.add_argument("--no-cut", action="store_true", help="do not cut images into crops + global view")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    """Decoding of chat answers (the defaults are greedy)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit in tokens (default 1024)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = no limit)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default 1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already seen less likely "
                   "(HF rule; default 1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default: unseeded)")


def _chat_parser(sub) -> None:
    c = _subcommand(sub, "chat", cmd_chat, "chat with a model (one question, or interactive without a prompt)")
    c.add_argument("prompt", nargs="*", help="the question; omit for an interactive chat")
    c.add_argument("--system", default=None, help="system prompt")
    _model_options(c)
    _media_options(c, files=True)
    _sampling_options(c)


def _pretrain_vision_parser(sub) -> None:
    from .config import PRESETS  # Owl3 presets (light: dataclasses only)

    pv = _subcommand(sub, "pretrain-vision", cmd_pretrain_vision, "stage 0 from scratch: pretrain a preset's vision "
                     "tower on dense synthetic labels (writes a SigLIP checkpoint for a recipe's init.vision)")
    pv.add_argument("--preset", default="owl3-synthetic", choices=sorted(PRESETS),
                    help="the Owl3 preset whose tower shape to train")
    pv.add_argument("--out", required=True, help="output directory")
    pv.add_argument("--steps", type=int, default=3000)
    pv.add_argument("--batch-size", type=int, default=32)
    pv.add_argument("--lr", type=float, default=1e-3)
    pv.add_argument("--warmup", type=int, default=100)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--eval-every", type=int, default=500)
    pv.add_argument("--exclude", nargs="*", default=[], metavar="SCENES_TXT",
                    help="<split>.scenes.txt files whose images are never drawn (the val and test splits)")
    pv.add_argument("--pair-labels", action="store_true",
                    help="also classify each patch's colour-kind pair (one class per pair), not only colour and kind")
    pv.add_argument("--drawn", type=float, default=0.0, metavar="P",
                    help="share of scenes in the drawn look (as `data synth --drawn`; default 0: the plain look only)")
    pv.add_argument("--free", type=float, default=0.0, metavar="P",
                    help="share of the drawn scenes whose objects lie anywhere, not each inside its third (the layout "
                         "`data synth --drawn` gives colour, shape, size and count questions; default 0)")
    pv.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")


def _serve_parser(sub) -> None:
    s = _subcommand(sub, "serve", cmd_serve, "OpenAI-compatible HTTP API (/v1/chat/completions) and a web chat page")
    _model_options(s).add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: cores - 1, one is left to the HTTP event loop)")
    _media_options(s, files=False)
    g = s.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    g = s.add_argument_group("request limits")
    g.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="allow file:// media URLs below DIR")
    g.add_argument("--no-remote-media", action="store_true", help="refuse http(s) media URLs")
    g.add_argument("--allowed-media-domains", default=None, metavar="HOSTS",
                   help="fetch http(s) media only from these comma-separated hosts (each with its subdomains)")
    g.add_argument("--allow-private-media-urls", nargs="?", const="all", default=None, metavar="NETS",
                   help="also fetch http(s) media from internal addresses (loopback, private, link-local ...): all, "
                        "or only those in the comma-separated networks NETS (e.g. 10.1.0.0/16); default: refused")
    g.add_argument("--max-images", type=int, default=16, help="image parts per request (default 16)")
    g.add_argument("--max-videos", type=int, default=2, help="video parts per request (default 2)")
    g.add_argument("--max-media-mb", type=float, default=MAX_MEDIA_BYTES / 2**20,
                   help="size limit of one image or video (MiB, default %(default)g)")
    g.add_argument("--max-body-mb", type=float, default=100.0, help="size limit of a request body (MiB)")
    g.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    g.add_argument("--live-session-idle-s", type=float, default=600.0,
                   help="free a live session (/v1/live) after this many seconds without a request (0 = never)")
    g = s.add_argument_group("batching and caching")
    g.add_argument("--batching", choices=("continuous", "dynamic"), default="continuous",
                   help="continuous (default): requests join and leave the running batch between decode steps, "
                        "over a paged K/V cache with prefix reuse; dynamic: a batch forms and runs to completion")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="continuous: K/V cache budget in GiB (default: sized from free memory)")
    g.add_argument("--max-running", type=int, default=64, help="continuous: requests decoded together (default 64)")
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="continuous: prompt tokens read per engine step, between decode steps (default 512)")
    g.add_argument("--max-batch-size", type=int, default=8, help="dynamic: requests decoded together (default 8)")
    g.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="dynamic: wait this long to fill a batch (default 10)")
    g.add_argument("--max-padded-images", type=int, default=32,
                   help="a request joins a batch only while the batch pads at most this many image slots (rows hold "
                        "as many visual K/V slots as the batch's largest request; default 32)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429 (default 64)")
    g.add_argument("--feature-cache-mb", type=float, default=512.0, help="visual feature cache size (MiB, 0 = off)")


def _eval_parser(sub) -> None:
    e = _subcommand(sub, "eval", cmd_eval, "evaluate on a benchmark file or a built-in synthetic set "
                    "(predictions + summary)",
                    description="Tasks: exact (conversation JSONL, exact match; the default), mmbench (TSV or "
                    "Parquet, CircularEval; a prediction file is scored without a model), vqa (JSON/JSONL, soft "
                    "accuracy), multi-image (NLVR2 yes/no or multiple choice), video-mc (also Video-MME, MVBench), "
                    "distractor (multiple choice among N irrelevant images, needs --pool), and "
                    "synthetic-single|multi|video|distractor (generated offline, no --data). Resumes from --out; "
                    "runs data-parallel under torchrun.")
    e.add_argument("--task", default="exact", help="exact (default), mmbench, vqa, multi-image, video-mc, distractor, "
                   "synthetic-single, synthetic-multi, synthetic-video, synthetic-distractor")
    e.add_argument("--data", default=None, help="the benchmark file (not for synthetic-* tasks)")
    e.add_argument("--out", default="results/eval", help="output directory (resumes if it has predictions)")
    e.add_argument("--limit", type=int, default=None, help="first N samples (synthetic-*: set size, default 100)")
    e.add_argument("--batch-size", type=int, default=8, help="conversations per padded batch")
    e.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default 16)")
    e.add_argument("--seed", type=int, default=0, help="distractor sampling and synthetic sets")
    e.add_argument("--scoring", default="generation", help="multiple-choice tasks: generation (default: answer "
                   "generated and parsed), likelihood (the option letter's log probability, one forward) or "
                   "likelihood-text (each option's text as the answer, mean logprob per token); docs/evaluation.md")
    e.add_argument("--ood", default=None, metavar="SET", help="exact: also score an out-of-distribution set (a folder "
                   "of `hyperowl data ood`, or its JSONL) into OUT/ood/, reported as summary.json's `ood` block")
    _model_options(e)
    g = e.add_argument_group("task-specific")
    g.add_argument("--annotations", default=None, help="vqa: the VQAv2 annotations file when --data is the official "
                   "questions file (v2_OpenEnded_mscoco_*_questions.json)")
    g.add_argument("--image-dir", default=None, help="vqa: folder of the images (default: the data file's folder)")
    g.add_argument("--frames", type=int, default=16, help="video-mc: frames sampled per video (default 16)")
    g.add_argument("--video-dir", default=None, help="video-mc: folder of the videos (default: the data file's "
                   "folder and its data/, video/, videos/; Video-MME's videoID.mp4 is looked up there)")
    g.add_argument("--no-circular", action="store_true", help="mmbench: score each question's base row once (no "
                   "circular copies or option rotations)")
    g.add_argument("--distractors", default="0,5,10", help="distractor: numbers of irrelevant images (default 0,5,10)")
    g.add_argument("--pool", default=None, help="distractor: folder of images, or JSONL of {\"image\": path}")
    g.add_argument("--variants", type=int, default=4, help="distractor: versions per question, all must be right")
    g.add_argument("--prompt-style", default="mc", choices=["mc", "open"], help="distractor: 'mc' lists lettered "
                   "options (default); 'open' asks without them and matches the answer to an option's text")
    g.add_argument("--cache-dir", default=None,
                   help="synthetic-*: where generated sets are kept (default OUT/synthetic-data)")


def _batch_parser(sub) -> None:
    b = _subcommand(sub, "batch", cmd_batch, "answer a dataset of records (JSONL/Parquet) into JSONL/Parquet, "
                    "resumable; locally, under torchrun, or on a Ray cluster (docs/batch.md)")
    b.add_argument("input", help="records: .jsonl or .parquet with id, messages (with <|image|>/<|video|>), images, "
                   "videos (paths relative to the file, absolute, or http(s) URLs)")
    b.add_argument("--out", required=True, help="output .jsonl or .parquet (id, answer, usage, error); a re-run "
                   "skips the ids already there")
    b.add_argument("--batch-size", type=int, default=8, help="records per padded engine batch (default 8)")
    b.add_argument("--system", default=None, help="system prompt")
    b.add_argument("--json-schema", default=None, metavar="FILE", help="every answer is JSON valid against the "
                   "schema in FILE (grammar-constrained; 'json_object': any JSON object); needs hyperowl[structured]")
    g = _model_options(b)
    g.add_argument("--feature-cache-mb", type=float, default=512.0, help="visual feature cache per replica (MiB)")
    _media_options(b, files=False)
    _sampling_options(b)
    g = b.add_argument_group("ray")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS", help="run on Ray: the "
                   "cluster at ADDRESS (default: the running one, else a local one); needs hyperowl[batch]; give "
                   "INPUT before --ray")
    g.add_argument("--replicas", type=int, default=1, help="model actors (default 1)")
    g.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per actor (default: 1 if the cluster "
                   "has GPUs, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per actor (default 1)")


def build_parser() -> argparse.ArgumentParser:
    """The `hyperowl` parser. Shared option groups (_model_options, _media_options, _sampling_options) keep the
    options that several subcommands take identical; dests and defaults are what the cmd_* functions read."""
    p = argparse.ArgumentParser(prog="hyperowl", description="Run mPLUG-Owl models: chat with images, many images and videos.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)  # subcommands in `hyperowl --help` order:
    _chat_parser(sub)

    t = _subcommand(sub, "train", cmd_train, "train or fine-tune from a YAML recipe (also under torchrun)")
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("--output", default=None, help="override the recipe's output directory")
    t.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in the output directory")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (multi-process runs)")
    t.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die mid-run like a kill

    ex = _subcommand(sub, "export", cmd_export, "write a LoRA training checkpoint's adapters in PEFT format")
    ex.add_argument("checkpoint", help="a checkpoint-STEP directory of a run with lora.r > 0")
    ex.add_argument("--peft", action="store_true", help="adapter_config.json + adapter_model.safetensors for peft")
    ex.add_argument("--out", required=True, help="output directory")

    pl = _subcommand(sub, "plot-log", cmd_plot_log, "draw the loss curve of a training log as a PNG")
    pl.add_argument("log", help="log.jsonl written by hyperowl train")
    pl.add_argument("--out", default=None, help="PNG path (default: next to the log)")

    u = _subcommand(sub, "upgrade", cmd_upgrade, "build an Owl3-style model from a text Qwen2 + a SigLIP checkpoint")
    u.add_argument("--text-llm", required=True, help="Qwen2 checkpoint dir or hub id")
    u.add_argument("--vision", required=True, help="SigLIP checkpoint dir or hub id")
    u.add_argument("--hyper-layers", required=True, help="1-based decoder layers to make hyper layers, e.g. 1,9,17,25")
    u.add_argument("--variant", default="240728", choices=["240728", "241101"])
    u.add_argument("--out", required=True, help="output directory (official layout)")

    _pretrain_vision_parser(sub)
    _serve_parser(sub)
    _eval_parser(sub)
    _batch_parser(sub)
    _watch_parser(sub)

    dt = _subcommand(sub, "data", cmd_data, "datasets: `hyperowl data synth --out DIR` writes the synthetic visual "
                     "world, `hyperowl data ood --out DIR` its out-of-distribution test set", add_help=False)
    dt.add_argument("rest", nargs=argparse.REMAINDER)

    cv = _subcommand(sub, "convert", cmd_convert, "one-shot: rewrite a pickle-only checkpoint (*.bin) as "
                     "safetensors (needs --trust-pickle)")
    cv.add_argument("src", help="checkpoint directory with pytorch_model*.bin")
    cv.add_argument("out", help="output directory (config and tokenizer files are copied)")
    cv.add_argument("--trust-pickle", action="store_true", help="I trust these pickle files (unpickling can run code)")

    i = _subcommand(sub, "info", cmd_info, "summarise a checkpoint without loading its weights")
    i.add_argument("path", help="checkpoint directory or hub id")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data" and "--debug" in args.rest:  # `data synth ... --debug`: the rest goes to synth
        args.rest = [a for a in args.rest if a != "--debug"]
        args.debug = True
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not 1 <= getattr(args, "frames", 1) <= MAX_FRAMES:
        print(f"hyperowl: error: --frames {args.frames}: must be between 1 and {MAX_FRAMES}", file=sys.stderr)
        return 2
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:  # what torch's generators take
        print(f"hyperowl: error: --seed {seed}: must fit in 64 bits ({SEED_RANGE[0]} .. {SEED_RANGE[1]})", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except HyperowlError as e:
        if args.debug:
            raise
        print(f"hyperowl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
