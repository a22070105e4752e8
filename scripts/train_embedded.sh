#!/usr/bin/env bash
# Rebuild the embedded default model from nothing: synthetic data -> training -> evaluation -> models/.
# About 15 minutes on 2 CPU cores. Usage: bash scripts/train_embedded.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/hyperowl ] || bash scripts/setup.sh
H=.venv/bin/hyperowl
[ -f data/synth/train.jsonl ] || $H data synth --out data/synth --train 24000 --val 500 --test 1000 --seed 0
$H train recipes/embedded.yaml
$H eval --model runs/embedded/final --data data/synth/test.jsonl --out results/embedded-test --batch-size 32
rm -rf models/owl3-synthetic && mkdir -p models/owl3-synthetic
cp runs/embedded/final/{config.json,model.safetensors,tokenizer.json} models/owl3-synthetic/
cp runs/embedded/loss.png results/embedded-test/summary.json models/owl3-synthetic/
