#!/usr/bin/env bash
# GPT 1.3B (24 layers, hidden 2048) on one node of 8 GPUs: tp 2 x pp 2 x dp 2, distributed SR optimizer.
#
#   DATA=data/my_text_document TOKENIZER=data/tok.model bash examples/pretrain_gpt_1.3b_8gpu.sh
#
# Ranks are laid out tp fastest, then dp, then pp (docs/parallel.md), so each tensor-parallel pair
# sits on neighbouring GPUs. On a CPU-only machine the same command runs on gloo (slowly): set
# NPROC=8 and DEVICE=cpu to try the launch path with a toy size (see tests/test_layouts.py).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-8}
TP=${TP:-2}
PP=${PP:-2}
DEVICE=${DEVICE:-auto}
DATA=${DATA:?set DATA to a preprocessed dataset prefix (tools/preprocess_data.py)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the sentencepiece model}
SAVE=${SAVE:-checkpoints/gpt_1.3b_tp${TP}_pp${PP}}

torchrun --standalone --nproc-per-node "$NPROC" pretrain_gpt.py \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --use-distributed-optimizer \
    --sequence-parallel \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
    --seq-length 2048 --max-position-embeddings 2048 \
    --micro-batch-size 4 --global-batch-size 256 \
    --precision bf16-sr \
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 \
    --hidden-dropout 0 --attention-dropout 0 \
    --train-iters 100000 \
    --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split 969,30,1 \
    --save "$SAVE" --load "$SAVE" --save-interval 1000 \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    --device "$DEVICE" \
    "$@"
