"""Where does a relation question lose its answer? A linear-probe diagnostic for issue 3.

Why this exists: the embedded model answers "where is the X?" on every test question (position 1.00) but
"is the A left of the B?" at chance (relation 0.42), and 2000 more steps on relation questions alone did not
move its loss off chance. Answering needs three hops: each object's name tokens read that object's cell from
the image (hyper attention), the answer position gathers both cells from the text, and an MLP compares them
along the asked axis. This script asks which hop fails: it runs the model on fresh relation questions (and,
as a control, position questions about the same scenes), keeps the residual stream after every layer at the
last token of A's name, of B's name and of the prompt, and fits a linear probe (multinomial logistic
regression, 75/25 split) for A's and B's coordinate on the asked axis, and for the answer. A coordinate that
a probe reads well at a position is there for the next hop to use; chance means it never got there.

    .venv/bin/python scripts/probe_relation.py --n 2000 --out results/probe_relation.json

Scenes are drawn fresh from --seed (a few may equal test scenes; this is a diagnostic, not a score).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hyperowl  # noqa: E402
from hyperowl.data import synthetic as syn  # noqa: E402
from hyperowl.errors import HyperowlError  # noqa: E402


def questions(n: int, seed: int) -> list[dict]:
    """n relation questions on fresh scenes: prompt, answer, the two objects' coordinates on the asked axis."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        scene = syn.random_scene(rng)
        rel = rng.choice(syn.RELATIONS)
        axis = 1 if rel in ("left of", "right of") else 0  # (row, col): columns for left/right
        pairs = [(a, b) for a in scene.objects for b in scene.objects
                 if scene.cell(a)[axis] != scene.cell(b)[axis]]
        if not pairs:
            continue
        a, b = rng.choice(pairs)
        ca, cb = scene.cell(a)[axis], scene.cell(b)[axis]
        truth = ca < cb if rel in ("left of", "above") else ca > cb
        ref = rng.choice(syn.SINGLE_REFS)
        q = rng.choice(syn.SINGLE_TEMPLATES["relation"]).format(img=ref, a=a.name, b=b.name, rel=rel)
        pos = syn.SINGLE_TEMPLATES["position"][0].format(img=ref, obj=a.name)
        out.append({"scene": scene, "q": q, "pos_q": pos, "a": a.name, "b": b.name, "answer": "yes" if truth else "no",
                    "a_coord": ca, "b_coord": cb, "a_cell": syn.GRID * scene.cell(a)[0] + scene.cell(a)[1]})
    return out


def last_token_of(proc, prompt: str, ids: list[int], name: str, after: int = 0) -> int:
    """Index in `ids` (the prompt's tokens) of the last token of the first `name` at or after character `after`
    (-1 if tokenizing the prompt up to there splits differently)."""
    end = prompt.index(name, after) + len(name)
    head, _ = proc._tokenize(prompt[:end])
    return len(head) - 1 if ids[: len(head)] == head else -1


@torch.no_grad()
def features(model, items: list[dict], key: str, names: bool) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Residual streams [N, layers+1, 3 positions (A, B, last), H] for the prompts in items[i][key] (A and B at
    the names' last tokens when `names`, else the last token again), and whether the model's next token
    prefers 'yes' over 'no' (relation prompts)."""
    proc = model.processor
    tok = proc.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False).ids[0], tok.encode("no", add_special_tokens=False).ids[0]
    feats, keep, says_yes = [], [], []
    for it in tqdm(items, desc=key, leave=False, mininterval=5):
        msgs = [{"role": "user", "content": syn.IMAGE_TOKEN + it[key]}]
        inp = proc(msgs, images=[it["scene"].render()])
        ia = ib = -1
        if names:
            prompt, ids = inp.prompt, inp.input_ids.tolist()
            ia = last_token_of(proc, prompt, ids, it["a"])
            ib = last_token_of(proc, prompt, ids, it["b"], prompt.index(it["a"]) + len(it["a"]))
            keep.append(ia >= 0 and ib >= 0)
        out = model(inp.input_ids[None], pixel_values=inp.pixel_values, image_positions=inp.image_positions[None],
                    output_hidden_states=True)
        hs = torch.stack([h[0] for h in out.hidden_states])  # [layers+1, L, H]
        feats.append(hs[:, [ia, ib, -1]])  # [layers+1, 3, H]
        says_yes.append(bool(out.logits[0, -1, yes] > out.logits[0, -1, no]))
    return torch.stack(feats).float(), torch.tensor(says_yes), keep


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression x -> y (first 75% train, rest test)."""
    torch.manual_seed(seed)
    n = int(0.75 * len(x))
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-5
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs[:n] @ w + b, y[:n]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((xs[n:] @ w + b).argmax(1) == y[n:]).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the embedded model)")
    ap.add_argument("--n", type=int, default=2000, help="relation questions (>= 40)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default="results/probe_relation.json")
    args = ap.parse_args()
    if args.n < 40:
        ap.error(f"--n {args.n}: need at least 200 questions for a held-out quarter")
    torch.set_num_threads(2)
    try:
        model = hyperowl.load(args.model)
    except HyperowlError as e:
        ap.error(str(e))
    model.eval()
    items = questions(args.n, args.seed)
    rel, says_yes, keep = features(model, items, "q", names=True)
    pos, _, _ = features(model, items, "pos_q", names=False)
    k = torch.tensor(keep)
    rel, pos, says_yes = rel[k], pos[k], says_yes[k]
    kept = [it for it, ok in zip(items, keep) if ok]
    ya = torch.tensor([it["a_coord"] for it in kept])
    yb = torch.tensor([it["b_coord"] for it in kept])
    ans = torch.tensor([it["answer"] == "yes" for it in kept]).long()
    cell = torch.tensor([it["a_cell"] for it in kept])
    n_test = len(kept) - int(0.75 * len(kept))

    def majority(y: torch.Tensor) -> float:
        t = y[int(0.75 * len(y)):]
        return float(t.bincount().max()) / len(t)

    layers = rel.shape[1]
    rows = []
    for layer in range(layers):
        rows.append({
            "layer": layer,  # 0 = embeddings, k = after decoder layer k (the last one final-normed)
            "A coord @ A name": probe(rel[:, layer, 0], ya, 3),
            "B coord @ B name": probe(rel[:, layer, 1], yb, 3),
            "A coord @ last": probe(rel[:, layer, 2], ya, 3),
            "B coord @ last": probe(rel[:, layer, 2], yb, 3),
            "A+B coord @ last": probe(rel[:, layer, 2], ya + yb, 5),  # both read, blended, without roles?
            "answer @ last": probe(rel[:, layer, 2], ans, 2),
            "control: A cell @ last of 'where is A'": probe(pos[:, layer, 2], cell, 9),
        })
    model_acc = float((says_yes == ans.bool()).float().mean())
    chance = {"coord": max(majority(ya), majority(yb)), "sum": majority(ya + yb), "answer": majority(ans),
              "cell": majority(cell)}
    cols = list(rows[0])[1:]
    print(f"{len(kept)} relation questions ({n_test} held out); the model's own yes/no accuracy: {model_acc:.3f}")
    print(f"majority-class chance: coordinate {chance['coord']:.2f}, A+B {chance['sum']:.2f}, answer "
          f"{chance['answer']:.2f}, cell {chance['cell']:.2f}")
    print("| layer | " + " | ".join(cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model or "the embedded model (hyperowl/assets/owl3-synthetic)", "n": len(kept),
                                          "held_out": n_test, "seed": args.seed, "model_accuracy": model_acc,
                                          "chance": chance, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
