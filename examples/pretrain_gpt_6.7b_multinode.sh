#!/usr/bin/env bash
# GPT 6.7B (examples/gpt_6.7b.yaml) over several nodes of 8 GPUs: tp 8 (inside a node) x pp 2 x dp.
# Run the same command on every node; torchrun's c10d rendezvous groups them:
#
#   NNODES=4 MASTER_ADDR=node0.example MASTER_PORT=29500 \
#   DATA=/shared/data/my_text_document TOKENIZER=/shared/data/tok.model \
#   bash examples/pretrain_gpt_6.7b_multinode.sh
#
# (under SLURM: srun --nodes=$NNODES --ntasks-per-node=1 bash examples/pretrain_gpt_6.7b_multinode.sh)
# With 4 nodes the world is 32 ranks = tp 8 x pp 2 x dp 2. tp varies fastest, so each tensor-parallel
# group is one node's 8 GPUs (NVLink); pipeline and data parallelism go across nodes. Every rank
# writes its checkpoint shard into --save, which must be on a filesystem that all nodes share.
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
    --config examples/gpt_6.7b.yaml \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
    --use-distributed-optimizer \
    --overlap-param-gather \
    --sequence-parallel \
    --micro-batch-size 1 --global-batch-size 1024 \
    --data-path $DATA --tokenizer-model "$TOKENIZER" \
    --save "$SAVE" --load "$SAVE" --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
