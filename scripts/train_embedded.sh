#!/usr/bin/env bash
# Rebuild the embedded default model from nothing: synthetic data (half of it in the drawn look) -> vision-tower
# pretraining (stage 0: drawn scenes laid out anywhere, 4000 steps at LR 2e-3, beside the video datasets) -> training
# (recipes/embedded-drawn.yaml, a direction phase included, by two data-parallel processes of one thread each under
# torchrun: 1.15-1.26x the steps per second of one process with two threads on 2 cores) -> evaluation on the test
# split and on the out-of-distribution set drawn by matplotlib -> hyperowl/assets/owl3-synthetic/ (package data).
# This is how the shipped model was built: 47.7 minutes on 2 idle cores (docs/embedded_model.md, "Drawn pictures").
# DRAWN=0 builds the model shipped before it instead (plain look only, recipes/embedded.yaml, ~54 minutes).
# Usage: bash scripts/train_embedded.sh     (KEEP_ASSETS=1: evaluate, but leave hyperowl/assets/ alone)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/hyperowl ] || bash scripts/setup.sh
H=.venv/bin/hyperowl
DRAWN=${DRAWN:-0.5}
if [ "$DRAWN" = 0 ]; then RECIPE=recipes/embedded.yaml; LOOK=(); S0_STEPS=2500; S0_LR=1e-3; FREE=0
else RECIPE=recipes/embedded-drawn.yaml; LOOK=(--drawn "$DRAWN"); S0_STEPS=4000; S0_LR=2e-3; FREE=1; fi
S0=
trap '[ -z "$S0" ] || kill "$S0" 2>/dev/null || true' EXIT  # never leave stage 0 running behind a failed step
# Reuse data/synth only if it is exactly this dataset (an older one, e.g. of another look, is rebuilt).
if ! .venv/bin/python -c "import json, sys; m = json.load(open('data/synth/meta.json')); t = m['splits']['train']
d = {'single': 0.4, 'multi': 0.2, 'video': 0.2, 'distractor': 0.2}
sys.exit(not (m['seed'] == 0 and m['train_turns'] == 3 and m.get('train_progressive') == 0.5 and m.get('train_mix', d) == d and m.get('drawn', 0) == $DRAWN and ('free_tasks' in m) == ($FREE == 1) and t['examples'] == 48000 and m['splits']['test']['examples'] == 1000))" 2>/dev/null; then
  rm -rf data/synth data/synth-video data/synth-direction runs/vision-synthetic
  $H data synth --out data/synth --train 48000 --val 500 --test 1000 --seed 0 --turns 3 --progressive 0.5 "${LOOK[@]}"
fi
# Stage 0: the tower learns what is where from dense per-patch labels of fresh scenes (never a val/test image). A
# tower of the other look is rebuilt. It needs only the val/test exclusions, so it runs beside the video datasets
# below (one torch thread: on 2 cores it steps about as fast as with two).
if ! .venv/bin/python -c "import json, sys; e = json.load(open('runs/vision-synthetic/eval.json'))
sys.exit(e.get('drawn', 0) != $DRAWN or e.get('free', 0) != $FREE or [e['steps'], e['lr']] != [$S0_STEPS, $S0_LR])" 2>/dev/null; then
  rm -rf runs/vision-synthetic
  $H pretrain-vision --preset owl3-synthetic --out runs/vision-synthetic --steps $S0_STEPS --lr $S0_LR --free $FREE \
    "${LOOK[@]}" --threads 1 --exclude data/synth/val.scenes.txt data/synth/test.scenes.txt &
  S0=$!
fi
# A training-only dataset of video conversations beside data/synth (DIR SEED N TASKS, and the task list its
# meta.json then holds): their own seed, never a scene of val or test; reused only if it is exactly this one. One
# writer process while stage 0 runs beside it.
video_set() {
  .venv/bin/python -c "import json, sys; m = json.load(open('$1/meta.json'))
sys.exit(not (m['seed'] == $2 and m['splits']['train']['examples'] == $3 and m.get('drawn', 0) == $DRAWN and m['tasks'] == $5 and m.get('exclude') == ['data/synth/val.scenes.txt', 'data/synth/test.scenes.txt']))" 2>/dev/null && return
  rm -rf "$1"
  $H data synth --out "$1" --seed "$2" --train "$3" --val 0 --test 0 --tasks "$4" "${LOOK[@]}" ${S0:+--workers 1} \
    --exclude data/synth/val.scenes.txt data/synth/test.scenes.txt
}
video_set data/synth-video 1 6000 video "['video/direction', 'video/appear', 'video/disappear', 'video/order']"
[ "$DRAWN" = 0 ] || video_set data/synth-direction 2 5000 video/direction "['video/direction']"  # the direction phase
# The out-of-distribution test set (another renderer): for the final report only, never for training or selection.
[ -f data/ood/ood.jsonl ] && [ "$(.venv/bin/python -c "import json; m = json.load(open('data/ood/meta.json')); print(m['n'], m['seed'])")" = "300 7" ] || \
  $H data ood --out data/ood --n 300 --seed 7
[ -z "$S0" ] || { wait "$S0"; S0=; }
if [ "$DRAWN" = 0 ] || [ "$(nproc)" -lt 2 ]; then $H train "$RECIPE"
else  # two data-parallel processes (the same global batch and gradient), half the cores each
  OMP_NUM_THREADS=$(( $(nproc) / 2 )) .venv/bin/torchrun --standalone --nproc_per_node 2 -m hyperowl.cli train "$RECIPE"
fi
rm -rf results/embedded-test  # a new model: never resume the previous one's predictions
$H eval --model runs/embedded/final --data data/synth/test.jsonl --ood data/ood --out results/embedded-test --batch-size 32
[ "${KEEP_ASSETS:-0}" = 1 ] && exit 0
rm -rf hyperowl/assets/owl3-synthetic && mkdir -p hyperowl/assets/owl3-synthetic
cp runs/embedded/final/{config.json,model.safetensors,tokenizer.json} hyperowl/assets/owl3-synthetic/
cp runs/embedded/loss.png results/embedded-test/summary.json hyperowl/assets/owl3-synthetic/
cp runs/vision-synthetic/eval.json hyperowl/assets/owl3-synthetic/vision_pretrain_eval.json
