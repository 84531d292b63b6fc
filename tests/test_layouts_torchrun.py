"""The real command line: `torchrun --nproc-per-node 8 pretrain_gpt.py --tensor-model-parallel-size 2
--pipeline-model-parallel-size 2 --use-distributed-optimizer --sequence-parallel ...` on gloo (CPU)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_eight_ranks_tp2_pp2_dp2():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
           str(REPO / "pretrain_gpt.py"),
           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
           "--use-distributed-optimizer", "--sequence-parallel",
           "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
           "--vocab-size", "128", "--make-vocab-size-divisible-by", "32", "--micro-batch-size", "1",
           "--global-batch-size", "8", "--train-iters", "2", "--mock-data", "--log-interval", "1",
           "--eval-interval", "0", "--eval-iters", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if re.search(r"iteration\s+\d+/\s*2 \|", line)]
    assert len(lines) == 2, proc.stdout[-3000:]  # logged once (rank 0), not by every rank
    for line in lines:
        loss = float(re.search(r"lm loss: ([0-9.E+-]+)", line).group(1))
        norm = float(re.search(r"grad norm: ([0-9.]+)", line).group(1))
        assert abs(loss - math.log(128)) < 0.5 and 0 < norm < 100, line
    assert "final validation loss" in proc.stdout
