"""One test matrix over the three model families (owl3-240728, owl3-241101, owl2) on tiny checkpoints:
the family table, load -> chat / stream / batch, the feature cache across turns, serving through the real
`openai` client (plain and streamed, with an image, the family's own stop tokens), evaluation and a short
training run. Plus the import graph: layers from bottom to top, no cycles, models/ imports nothing above."""

from __future__ import annotations

import ast
import base64
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import hyperowl
from conftest import OWL2_FIXTURE, OWL3_FIXTURE, make_tokenizer, random_owl3
from hyperowl.families import FAMILIES, family_of

FAMILY_NAMES = ["owl3-240728", "owl3-241101", "owl2"]
PKG = Path(hyperowl.__file__).parent


def _checkpoint_dir(name: str, root: Path) -> Path:
    from hyperowl.checkpoint import save_checkpoint

    d = root / name
    if name == "owl3-241101":  # no official tiny 241101 fixture: a random tiny model in the official layout
        save_checkpoint(random_owl3("241101", seed=3), d)
    else:
        fix = OWL2_FIXTURE if name == "owl2" else OWL3_FIXTURE
        if not (fix / "model.safetensors").exists():
            pytest.skip(f"fixture {fix} is missing")
        d.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(fix / f, d / f)
    make_tokenizer().save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_dir(request, tmp_path_factory):
    return request.param, _checkpoint_dir(request.param, tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def pipe(family_dir):
    return hyperowl.load(family_dir[1], device="cpu")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(p)
    return p


MSG = [{"role": "user", "content": "<|image|>What colour is the circle?"}]


def test_the_table_names_the_family_of_each_checkpoint(family_dir, pipe):
    name, _ = family_dir
    fam = FAMILIES[name]
    assert pipe.family is fam and family_of(pipe.model) is fam and type(pipe.model) is fam.model_cls
    assert type(pipe.processor).__name__ == ("Owl2Processor" if name == "owl2" else "Owl3Processor")
    tok = pipe.processor.tokenizer
    want = [tok.token_to_id(t) for t in fam.stop_tokens if tok.token_to_id(t) is not None]
    assert set(want) <= set(pipe.stop_ids) and pipe.stop_ids
    if name == "owl2":  # Owl2 ends answers with </s> / its config's eos, not with ChatML's tokens
        assert fam.stop_tokens == ("</s>",) and set(pipe.stop_ids) == set(want) | {pipe.model.config.eos_token_id}
    else:
        assert set(pipe.stop_ids) == set(want) and tok.token_to_id("<|im_end|>") in pipe.stop_ids
    # nothing bolted onto the module: the pipeline holds processor, encoder and checkpoint folder
    assert not any(hasattr(pipe.model, a) for a in ("processor", "checkpoint_dir", "quantized", "source_dirs", "chat"))


def test_chat_stream_batch_and_cache(pipe, image_file, monkeypatch):
    answer = pipe.chat(MSG, images=[str(image_file)], max_new_tokens=6)
    assert isinstance(answer, str)
    assert "".join(pipe.stream(MSG, images=[str(image_file)], max_new_tokens=6)) == answer
    convs = [{"messages": MSG, "images": [str(image_file)]}, {"messages": [{"role": "user", "content": "Hello?"}]}]
    assert pipe.chat_batch(convs, max_new_tokens=6) == [answer, pipe.chat(convs[1]["messages"], max_new_tokens=6)]
    # a second turn about the same picture: the image is not encoded again (the tower is never called)
    calls = []
    real = pipe.model.encode_images
    monkeypatch.setattr(pipe.model, "encode_images", lambda px: calls.append(px.shape[0]) or real(px))
    turn2 = MSG + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And its shape?"}]
    pipe.chat(turn2, images=[str(image_file)], max_new_tokens=4)
    assert calls == []
    pipe.encoder.cache.max_bytes = 0  # off: the same turn encodes the image (the check above can fail)
    try:
        pipe.chat(turn2, images=[str(image_file)], max_new_tokens=4)
    finally:
        pipe.encoder.cache.max_bytes = 256 * 2**20
    assert calls and sum(calls) == pipe.processor.plan(MSG, images=[str(image_file)]).num_images


def test_serve_plain_and_streamed_through_openai(pipe, image_file, family_dir):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from hyperowl.serve import ServeConfig, ServerThread, create_app

    data = "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    ref = pipe.chat(MSG, images=[str(image_file)], max_new_tokens=8)
    app = create_app(pipe, None, ServeConfig(model_name="m"))
    assert app.state.serve.stops == pipe.stop_ids  # the family's stop tokens, not ChatML's for everyone
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
        assert r.choices[0].message.content == ref
        assert r.usage.prompt_tokens_details.model_dump()["image_tensors"] >= 1
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=True)
                           if c.choices)
        assert streamed == ref


def test_eval(pipe, image_file, tmp_path):
    from hyperowl.eval.runner import evaluate

    shutil.copy(image_file, tmp_path / "r.png")
    rows = [{"id": "a", "task": "single/colour", "messages": [{"role": "user", "content": "<|image|>Colour?"}],
             "images": ["r.png"], "answer": "red"},
            {"id": "b", "task": "multi/same", "messages": [{"role": "user", "content": "<|image|><|image|>Same?"}],
             "images": ["r.png", "r.png"], "answer": "yes"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = evaluate(pipe, tmp_path / "t.jsonl", tmp_path / "out", batch_size=2, max_new_tokens=3)
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert s["n"] == 2 and [p["id"] for p in preds] == ["a", "b"]
    assert preds[0]["prediction"] == pipe.chat(rows[0]["messages"], images=[str(tmp_path / "r.png")], max_new_tokens=3)


def test_training_runs_and_saves_the_family_layout(family_dir, image_file, tmp_path):
    from hyperowl.train.recipe import Recipe
    from hyperowl.train.trainer import train

    name, d = family_dir
    shutil.copy(image_file, tmp_path / "r.png")
    with open(tmp_path / "train.jsonl", "w") as f:
        for c in ("red", "blue", "green", "red"):
            f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|>Colour?"},
                                             {"role": "assistant", "content": c}], "images": ["r.png"]}) + "\n")
    out = train(Recipe.from_dict({"init": {"from": str(d)}, "data": {"train": str(tmp_path / "train.jsonl")},
                                  "stage": "instruct", "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 2},
                                  "batch_size": 2, "output": str(tmp_path / "run"), "log_every": 1, "save_every": 2}))
    again = hyperowl.load(out / "final", device="cpu")
    assert again.family.name == name
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == FAMILIES[name].model_type


# -- the import graph -------------------------------------------------------------------------------------------
# Bottom to top. A module may import from its own layer or below, never above; and the graph has no cycle.
LAYERS = [
    ["errors", "config", "keymaps", "limits", "config_schema"],
    ["cache", "paged_cache", "models", "quantize"],
    ["processing"],
    ["families", "feature_cache"],
    ["checkpoint", "encoder", "structured", "engine", "batching"],
    ["chat", "pipeline", "live"],
    ["data", "eval", "serve", "train", "batch"],
    ["cli"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every hyperowl module this file imports, at the top or (unless top_level_only) inside functions."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hyperowl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hyperowl"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}  # `from . import keymaps` names a module
    return out


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p, top_level_only) if i in files and i != m} for m, p in files.items()}


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_import_layers_and_no_cycles():
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    unknown = sorted({_top(m) for m in graph} - set(LAYER_OF) - {""})
    assert not unknown, f"modules with no layer in this test: {unknown}"
    upward = [(m, i) for m, deps in graph.items() if _top(m) for i in deps
              if _top(i) and LAYER_OF[_top(i)] > LAYER_OF[_top(m)]]
    assert not upward, f"imports from a higher layer: {upward}"
    models_up = [(m, i) for m, deps in graph.items() if _top(m) == "models" for i in deps
                 if _top(i) in ("engine", "chat", "serve", "train", "eval", "pipeline", "encoder", "cli", "families")]
    assert not models_up
    # No cycle among the imports Python runs at load time (package __init__ files, which re-export their
    # children, left out). A function-level import may point back within its own layer (the layer rule
    # above already refuses every upward one, lazy or not).
    graph = _graph(top_level_only=True)
    nodes = {m for m in graph if not (PKG.parent / m.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if d not in nodes:
                continue
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(nodes):
        if m not in state:
            visit(m, [m])


def test_the_import_check_catches_an_upward_import(monkeypatch):
    """The check above can fail: a models/ module importing the engine is reported."""
    real = _imports

    def planted(path: Path, top_level_only: bool = False) -> set[str]:
        got = real(path, top_level_only)
        return got | {"hyperowl.engine"} if path.name == "owl3.py" and path.parent.name == "models" else got

    monkeypatch.setitem(globals(), "_imports", planted)
    with pytest.raises(AssertionError, match="higher layer"):
        test_import_layers_and_no_cycles()


def test_the_import_check_catches_a_cycle(monkeypatch):
    """...and a load-time cycle within one layer: engine <-> encoder."""
    real = _imports

    def planted(path: Path, top_level_only: bool = False) -> set[str]:
        got = real(path, top_level_only)
        return got | {"hyperowl.engine"} if path.name == "encoder.py" else got

    monkeypatch.setitem(globals(), "_imports", planted)
    with pytest.raises(AssertionError, match="import cycle"):
        test_import_layers_and_no_cycles()
