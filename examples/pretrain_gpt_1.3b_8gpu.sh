#!/usr/bin/env bash
# GPT 1.3B (examples/gpt_1.3b.yaml) on one node of 8 GPUs: tp 2 x pp 2 x dp 2, distributed SR optimizer,
# sequence parallelism.
#
#   DATA=data/my_text_document TOKENIZER=data/tok.model bash examples/pretrain_gpt_1.3b_8gpu.sh
#
# Ranks are laid out tp fastest, then dp, then pp (docs/parallel.md), so each tensor-parallel pair sits
# on neighbouring GPUs. Any flag added after the script's name overrides the YAML and the lines below.
# Without GPUs the same launch runs on gloo with --device cpu (slowly; tests/test_layouts_torchrun.py).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-8}
TP=${TP:-2}
PP=${PP:-2}
DATA=${DATA:?set DATA to a dataset prefix from tools/preprocess_data.py}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the sentencepiece model from tools/train_tokenizer.py}
SAVE=${SAVE:-checkpoints/gpt_1.3b_tp${TP}_pp${PP}}

torchrun --standalone --nproc-per-node "$NPROC" pretrain_gpt.py \
    --config examples/gpt_1.3b.yaml \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --use-distributed-optimizer \
    --overlap-param-gather \
    --sequence-parallel \
    --micro-batch-size 4 --global-batch-size 512 \
    --data-path $DATA --tokenizer-model "$TOKENIZER" \
    --save "$SAVE" --load "$SAVE" --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
