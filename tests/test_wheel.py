"""The built wheel stands alone: installed outside the checkout, `hyperowl chat` answers with the embedded default
model, which must therefore be package data inside the wheel (hyperowl/assets/owl3-synthetic)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET = "hyperowl/assets/owl3-synthetic"
ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source (the checkout is left untouched), installed with pip into a
    folder of its own; returns that folder."""
    if not (ROOT / ASSET / "model.safetensors").is_file():
        pytest.skip(f"the embedded model is not in {ROOT / ASSET}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hyperowl", src / "hyperowl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
              "-w", str(dist), str(src)], cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("hyperowl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [f for f in ASSET_FILES if f"{ASSET}/{f}" not in names]
    assert not missing, f"the wheel lacks the embedded model's {missing} (package-data in pyproject.toml)"
    site = tmp / "site"
    r = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
              str(wheel)], cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return site


def _env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HYPEROWL_DEFAULT_MODEL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return env


def test_installed_wheel_finds_its_default_model(installed):
    code = "import json, hyperowl; print(json.dumps([hyperowl.__file__, str(hyperowl.default_model_dir())]))"
    r = _run([sys.executable, "-c", code], cwd=installed.parent, env=_env(installed))
    assert r.returncode == 0, r.stderr
    module, model = (Path(p).resolve() for p in json.loads(r.stdout.strip().splitlines()[-1]))
    site = installed.resolve()
    assert module.is_relative_to(site), f"imported {module}, not the installed wheel in {site}"
    assert model.is_relative_to(site), model
    assert all((model / f).is_file() for f in ASSET_FILES)


def test_installed_wheel_chats_with_the_default_model(installed):
    """The README's first command, run against the installed wheel from outside the checkout."""
    ex = json.loads((ROOT / "examples" / "examples.json").read_text())[0]
    r = _run([sys.executable, "-m", "hyperowl.cli", "chat", "--max-new-tokens", "8", "--image",
              str(ROOT / "examples" / ex["file"]), ex["question"]], cwd=installed.parent, env=_env(installed))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().lower() == ex["answer"], r.stdout + r.stderr  # the same answer test_embedded expects
