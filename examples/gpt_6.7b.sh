#!/usr/bin/env bash
# GPT 6.7B with the bf16-sr recipe on one node. Edit the paths and sizes below, then:
#   bash examples/gpt_6.7b.sh
set -euo pipefail

# ---- edit these ----
DATA_PATH=data/my_corpus_text_document     # from tools/preprocess_data.py (a blend: "0.7 A 0.3 B")
TOKENIZER=data/tokenizer.model             # from tools/train_tokenizer.py
SAVE=checkpoints/gpt_6.7b
GPUS_PER_NODE=${GPUS_PER_NODE:-2}    # dp = GPUS / (tp x pp)
TRAIN_ITERS=100000
GLOBAL_BATCH=1024
MICRO_BATCH=2
# --------------------

cd "$(dirname "$0")/.."
torchrun --standalone --nproc-per-node "$GPUS_PER_NODE" pretrain_gpt.py \
    --config examples/gpt_6.7b.yaml \
    --data-path $DATA_PATH \
    --tokenizer-model "$TOKENIZER" \
    --train-iters "$TRAIN_ITERS" \
    --global-batch-size "$GLOBAL_BATCH" \
    --micro-batch-size "$MICRO_BATCH" \
    --save "$SAVE" --load "$SAVE" \
    --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
