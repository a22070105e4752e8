"""Exact resume in every mode (LoRA + align / instruct, full, FSDP2) after SIGKILL and SIGTERM, one run per
output directory, checkpoint rotation, the start banner, TensorBoard logging, typed recipes, interop files."""

import json
import signal
import subprocess
import warnings
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hyperowl.errors import InputError
from hyperowl.train.recipe import Recipe
from hyperowl.train.trainer import SIGTERM_EXIT, train
import test_train
from test_train import ENV, recipe_for, run_cli, torchrun_failure, write_recipe

colour_data = test_train.colour_data  # the shared fixture

# one thread everywhere: in-process runs and CLI processes must sum in the same order (bit equality)
MODES = {
    "lora_align": {"stage": "align", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    "lora_instruct": {"stage": "instruct", "lora": {"r": 4, "alpha": 8}},
    "full": {"stage": "instruct"},
}


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def same_run(a, b):
    """Losses equal step for step, every step logged once, and the same final weights."""
    la, lb = log_of(a), log_of(b)
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, len(la) + 1))
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupt(cmd, log, sig, lines):
    """Start `cmd`, send it `sig` once its log has `lines` steps (mid-run, from outside); returns (rc, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= lines):
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_after_sigkill_and_sigterm_is_exact_in_every_mode(tmp_path, colour_data, mode):
    """Interrupted from outside by SIGKILL (resumes from the last periodic checkpoint) and by SIGTERM (finishes
    the step, saves checkpoint-k, exits 143), --resume gives the uninterrupted run's losses step for step (each
    step logged once) and its final weights bit for bit."""
    over = dict(MODES[mode], optim={"max_steps": 16}, save_every=4, num_threads=1, batch_size=2)
    ref = train(recipe_for(colour_data, tmp_path / "ref", **over))
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / sig.name
        part = write_recipe(tmp_path / f"{sig.name}.yaml", colour_data, out, **over)
        rc, err = interrupt([sys.executable, "-m", "hyperowl.cli", "train", str(part)], out / "log.jsonl", sig, 5)
        assert not (out / "final").exists(), "finished before the signal"
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
            k = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
            assert k % 4 == 0 and k >= 4
        else:
            assert rc == SIGTERM_EXIT, err
            k = log_of(out)[-1]["step"]  # the step it was in when the signal came: finished and saved
            assert "SIGTERM: saved" in err and (out / f"checkpoint-{k}").is_dir()
        resumed = run_cli("train", str(part), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming from {out / f'checkpoint-{k}'} (step {k} of 16)" in resumed.stderr
        same_run(ref, out)


def test_fsdp_resume_after_kill_and_sigterm_is_exact(tmp_path, colour_data):
    """Two processes with --fsdp: killed after step 3 (both die; checkpoint-2), and SIGTERM sent to torchrun
    (it passes it on; both processes finish the step, agree, save, exit): --resume gives the uninterrupted
    losses step for step and its final weights."""
    over = dict(optim={"max_steps": 10}, save_every=2, num_threads=1)

    def torchrun(recipe, port, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "hyperowl.cli", "train", str(recipe), "--fsdp", *extra]

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        if r.returncode != 0 and "(SIGSEGV)" in r.stderr and "--stop-after" not in cmd:
            # Seen once in ~10 runs: a gloo worker segfaulting on this shared 2-core machine (not yet
            # understood; noted on issue 27). A crash is an interruption too: run the same command again, and
            # every check below still applies to the run it leaves.
            warnings.warn(f"torchrun worker crashed (SIGSEGV); running again: {torchrun_failure(r)[-500:]}")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        return r

    ref = write_recipe(tmp_path / "ref.yaml", colour_data, tmp_path / "ref", **over)
    r = run(torchrun(ref, 29541))
    assert r.returncode == 0, torchrun_failure(r)
    kill = write_recipe(tmp_path / "kill.yaml", colour_data, tmp_path / "kill", **over)
    r = run(torchrun(kill, 29542, "--stop-after", "3"))
    assert r.returncode != 0 and (tmp_path / "kill" / "checkpoint-2" / "trainer_state" / "rng" / "rank-1.safetensors").is_file()
    r = run(torchrun(kill, 29543, "--resume"))
    assert r.returncode == 0, torchrun_failure(r)
    assert f"resuming from {tmp_path / 'kill' / 'checkpoint-2'} (step 2 of 10)" in r.stderr
    same_run(tmp_path / "ref", tmp_path / "kill")

    term = write_recipe(tmp_path / "term.yaml", colour_data, tmp_path / "term", **over)
    rc, err = interrupt(torchrun(term, 29544), tmp_path / "term" / "log.jsonl", signal.SIGTERM, 3)
    assert rc != 0 and not (tmp_path / "term" / "final").exists(), err[-3000:]
    k = log_of(tmp_path / "term")[-1]["step"]
    assert (tmp_path / "term" / f"checkpoint-{k}" / "trainer_state" / "rng" / "rank-1.safetensors").is_file(), err[-3000:]
    r = run(torchrun(term, 29545, "--resume"))
    assert r.returncode == 0, torchrun_failure(r)
    same_run(tmp_path / "ref", tmp_path / "term")


def test_one_run_per_output_directory_rotation_and_banner(tmp_path, colour_data):
    """A second run into a directory that holds one is refused (one line, names --resume/--overwrite);
    --overwrite replaces it (no old checkpoint left for a later --resume to pick); save_total_limit keeps the
    last K checkpoints; the banner names the trained parts with their counts and the effective batch."""
    over = dict(stage="custom", trainable={"projector": True}, lora={"r": 2, "alpha": 4}, optim={"max_steps": 5},
                save_every=1, save_total_limit=2, num_threads=1, batch_size=2, grad_accum=2)
    out = tmp_path / "run"
    train(recipe_for(colour_data, out, **over))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    with pytest.raises(InputError, match="already holds a run .*--resume .*--overwrite"):
        train(recipe_for(colour_data, out, **over))
    y = write_recipe(tmp_path / "r.yaml", colour_data, out, **dict(over, optim={"max_steps": 3}))
    r = run_cli("train", str(y))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", str(y), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert [x["step"] for x in log_of(out)] == [1, 2, 3]
    # the banner: the parts' trainable counts recomputed here from the saved tensors
    state = out / "checkpoint-3" / "trainer_state"
    n_lora = sum(t.numel() for t in load_file(str(state / "adapters.safetensors")).values())
    n_proj = sum(t.numel() for k, t in load_file(str(state / "trainable.safetensors")).items() if k.startswith("projector."))
    assert f"projector {n_proj:,}," in r.stderr and f"LoRA adapters {n_lora:,}" in r.stderr and "llm 0 (frozen)" in r.stderr
    assert "starting at step 0 of 3" in r.stderr
    assert "effective batch 4 = 2 per process x 1 process x 2 accumulation steps" in r.stderr


def test_tensorboard_logger_and_missing_packages(tmp_path, colour_data, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(recipe_for(colour_data, tmp_path / "tb", logger="tensorboard", optim={"max_steps": 3}, save_every=0,
                           batch_size=2))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log_of(out)]
    for package in ("wandb", "tensorboard"):  # not installed (None in sys.modules: import fails): said before training
        monkeypatch.setitem(sys.modules, package, None)
        with pytest.raises(InputError, match=rf"logger: {package} needs the '{package}' package.*"
                                             rf"pip install 'hyperowl\[{package}\]'"):
            train(recipe_for(colour_data, tmp_path / package, logger=package))
        assert not (tmp_path / package).exists()
    with pytest.raises(InputError, match="logger must be one of none, tensorboard, wandb; got 'mlflow'"):
        recipe_for(colour_data, tmp_path / "x", logger="mlflow")


@pytest.mark.parametrize("recipe, message", [
    ({"optim": {"max_steps": "ten"}}, "optim.max_steps: expected an integer, got 'ten'"),
    ({"lora": {"r": "eight"}}, "lora.r: expected an integer, got 'eight'"),
    ({"data": {"train": ["a.jsonl", "b.jsonl"]}}, "data.train: expected a string, got ['a.jsonl', 'b.jsonl'] (one record file"),
    ({"bf16": "maybe"}, "bf16: expected true or false, got 'maybe'"),
    ({"batch_size": True}, "batch_size: expected an integer, got True"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas: expected a list of 2 numbers, got [0.9, 'x'] ([1]: 'x')"),
    ({"data": {"workers": "two"}}, "data.workers: expected an integer or null, got 'two'"),
    ({"phases": [{}, {"optim": {"warmup_steps": "x"}}]}, "phase 2: optim.warmup_steps: expected an integer, got 'x'"),
])
def test_recipe_values_are_typed(tmp_path, recipe, message):
    with pytest.raises(InputError) as e:
        Recipe.from_dict(recipe, f"recipe '{tmp_path / 'r.yaml'}'")
    assert str(e.value) == f"recipe '{tmp_path / 'r.yaml'}': {message}" or message in str(e.value)
    assert "\n" not in str(e.value)


def test_recipe_reads_yaml_strings_as_the_types_they_spell(tmp_path):
    (tmp_path / "r.yaml").write_text("optim: {lr: 1e-4, min_lr_ratio: 5e-2}\nbatch_size: '2'\nbf16: 'no'\n"
                                     "lora: {r: '8'}\nsave_total_limit: '3'\n")
    r = Recipe.from_yaml(tmp_path / "r.yaml")
    assert (r.optim.lr, r.optim.min_lr_ratio, r.batch_size, r.bf16, r.lora.r, r.save_total_limit) == (1e-4, 0.05, 2, False, 8, 3)
    (tmp_path / "bad.yaml").write_text("optim: {max_steps: ten}\n")
    r = run_cli("train", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'bad.yaml'}: optim.max_steps: expected an integer, got 'ten'" in r.stderr


def test_resume_and_overwrite_together_are_refused(tmp_path, colour_data):
    with pytest.raises(InputError, match="pass one"):
        train(recipe_for(colour_data, tmp_path / "o"), resume=True, overwrite=True)


def test_wandb_logger_offline(tmp_path, colour_data, monkeypatch):
    """logger: wandb in offline mode: every logged loss is in the W&B run file (the values as W&B stores them,
    JSON text); the run lives in output/wandb."""
    pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train(recipe_for(colour_data, tmp_path / "wb", logger="wandb", optim={"max_steps": 3}, save_every=0,
                           batch_size=2))
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    raw = files[0].read_bytes()
    assert b"loss" in raw and b"grad_norm" in raw
    assert all(json.dumps(r["loss"]).encode() in raw for r in log_of(out))
