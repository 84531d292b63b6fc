#!/usr/bin/env bash
# GPT 6.7B (32 layers, hidden 4096) over several nodes of 8 GPUs: tp 8 (inside a node) x pp 2 x dp.
# Run the same command on every node; torchrun's c10d rendezvous groups them:
#
#   NNODES=4 MASTER_ADDR=node0.example MASTER_PORT=29500 \
#   DATA=/shared/data/my_text_document TOKENIZER=/shared/data/tok.model \
#   bash examples/pretrain_gpt_6.7b_multinode.sh
#
# (under SLURM: srun --nodes=$NNODES --ntasks-per-node=1 bash examples/pretrain_gpt_6.7b_multinode.sh)
# With 4 nodes the world is 32 ranks = tp 8 x pp 2 x dp 2. tp is the fastest-varying rank, so each
# tensor-parallel group is one node's 8 GPUs (NVLink); pp and dp go across nodes. Checkpoints are
# written by every rank into --save, which must be on a filesystem all nodes share.
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:?set NNODES}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first node}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-8}
PP=${PP:-2}
DATA=${DATA:?set DATA}
TOKENIZER=${TOKENIZER:?set TOKENIZER}
SAVE=${SAVE:-checkpoints/gpt_6.7b_tp${TP}_pp${PP}}

torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron_sr}" \
    pretrain_gpt.py \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --use-distributed-optimizer \
    --sequence-parallel \
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \
    --seq-length 2048 --max-position-embeddings 2048 \
    --micro-batch-size 1 --global-batch-size 512 \
    --precision bf16-sr \
    --lr 1.2e-4 --min-lr 1.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 \
    --hidden-dropout 0 --attention-dropout 0 \
    --recompute-activations \
    --train-iters 150000 \
    --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split 969,30,1 \
    --save "$SAVE" --load "$SAVE" --save-interval 1000 \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    "$@"
