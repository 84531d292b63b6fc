#!/usr/bin/env python3
"""The distributed-optimizer path on one GPU (dp = 1) with the fused kernel vs the non-distributed path.

Runs a small BF16 MLP for a few steps three ways, from the same init and data (then a GPT model, SRAdamW vs
DistributedOptimizer fed the same gradients):
  A  DistributedDataParallel + DistributedOptimizer (bucketed buffers, fused SR AdamW on the pieces);
  B  the non-distributed update: one AdamWChunk per parameter on `param.grad` (what a single-process
     optimizer does), fused kernel;
  C  path A with MEGATRON_SR_FUSED=0 (the PyTorch reference).
The SR streams are the same, so A, B and C must agree bit for bit (params and losses), for BF16 and
FP32 gradient buffers. Also times one DistributedOptimizer.step() on a larger model.

    python tools/gpu_check_distributed.py [--out bench/results/distributed_gpu_check.txt] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: two runs, same grads

import torch
from torch import nn

from megatron_sr.config import OptimizerConfig
from megatron_sr.distributed import DDPConfig, DistributedDataParallel, DistributedOptimizer
from megatron_sr.optimizer.adamw_reference import AdamWConstants, step_scalars
from megatron_sr.optimizer.dispatch import AdamWChunk, adamw_step_
from megatron_sr.optimizer.sr_streams import assign_sr_streams, sr_key_for
from megatron_sr.parallel import parallel_state as ps

LR, WD, SEED, STEPS = 1e-3, 0.1, 1234, 5


def build(hidden: int, layers: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)]
    model = nn.Sequential(*blocks).to(device=device, dtype=torch.bfloat16)
    assign_sr_streams([model])
    return model


def data(hidden: int, device: str):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, hidden, generator=g).to(device, torch.bfloat16),
             torch.randn(16, hidden, generator=g).to(device)) for _ in range(STEPS)]


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x).float(), y)


def run_distributed(hidden, layers, grad_dtype, device, fused: bool):
    os.environ["MEGATRON_SR_FUSED"] = "1" if fused else "0"
    os.environ["MEGATRON_SR_COMPILE_FALLBACK"] = "0"  # path C: the eager reference, the definition itself
    ddp = DistributedDataParallel(build(hidden, layers, device), DDPConfig(
        grad_dtype=grad_dtype, use_distributed_optimizer=True, bucket_size=300_000))
    opt = DistributedOptimizer(ddp, OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=0.0, precision="bf16-sr"),
                               seed=SEED)
    losses, paths = [], set()
    for x, y in data(hidden, device):
        opt.zero_grad()
        loss = loss_of(ddp, x, y)
        loss.backward()
        result = opt.step()
        assert result.updated
        paths.add(result.path)
        losses.append(loss.item())
    return [q.detach().clone() for q in ddp.module.parameters()], losses, paths, len(ddp.buffer.buckets)


def run_plain(hidden, layers, grad_dtype, device):
    os.environ["MEGATRON_SR_FUSED"] = "1"
    model = build(hidden, layers, device)
    params = list(model.parameters())
    states = [(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)) for p in params]
    consts = AdamWConstants.make(0.9, 0.999, 1e-8)
    losses, paths = [], set()
    for step, (x, y) in enumerate(data(hidden, device), start=1):
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        scalars = step_scalars(LR, step, 0.9, 0.999, device)
        by_key: dict = {}
        for p, (m, v) in zip(params, states):
            by_key.setdefault(sr_key_for(p, SEED), []).append(AdamWChunk(
                p.data.view(-1), p.grad.to(grad_dtype).view(-1), m.view(-1), v.view(-1), p.sr_index_base,
                WD if p.dim() > 1 else 0.0))
        for key, chunks in by_key.items():
            paths.add(adamw_step_(chunks, scalars=scalars, step=step, consts=consts, rounding="stochastic", key=key))
        losses.append(loss.item())
    return params, losses, paths


def gpt_check(device: str) -> tuple[bool, str]:
    """GPT model: the trainer's SRAdamW vs build_data_parallel's DistributedOptimizer, fed the same gradients."""
    from megatron_sr.config import Config, ModelConfig, finalize
    from megatron_sr.distributed.factory import build_data_parallel
    from megatron_sr.model import GPTModel
    from megatron_sr.optimizer.sr_adamw import SRAdamW

    cfg = Config(model=ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=128,
                                   vocab_size=1024, hidden_dropout=0.0, attention_dropout=0.0))
    cfg.data.mock_data = True
    cfg = finalize(cfg)
    o = cfg.optimizer
    o.lr, o.weight_decay, o.clip_grad = LR, WD, 0.0  # the norms differ in the last bits (summation order)

    def model():
        m = GPTModel(cfg.model, seed=cfg.training.seed, params_dtype=torch.bfloat16).to(device)
        assign_sr_streams([m])
        return m

    ref, dist_model = model(), model()
    opt_ref = SRAdamW([ref], o, seed=cfg.training.seed)
    ddp, opt = build_data_parallel(dist_model, o, seed=cfg.training.seed, use_distributed_optimizer=True,
                                   bucket_size=1_000_000)
    g = torch.Generator().manual_seed(9)
    same_losses, paths, norms = True, set(), []
    for _ in range(STEPS):
        tokens = torch.randint(0, 1024, (4, 129), generator=g).to(device)
        opt_ref.zero_grad()
        opt.zero_grad()
        loss = ref(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
        with torch.no_grad():
            loss_d = ddp(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
        same_losses &= loss.item() == loss_d.item()
        loss.backward()
        for p, q in zip(ref.parameters(), dist_model.parameters()):
            q.main_grad.copy_(p.grad)  # the same gradients into the DDP buffer (backward on GPU may use atomics)
        ddp._synced = True
        r_ref, r = opt_ref.step(), opt.step()
        paths.update((r_ref.path, r.path))
        norms.append((r_ref.grad_norm, r.grad_norm))
    same = _bitwise([p.detach() for p in ref.parameters()], [p.detach() for p in dist_model.parameters()])
    n = sum(p.numel() for p in ref.parameters())
    return same and same_losses, (f"GPT {n / 1e6:.2f}M params, {STEPS} steps, path {sorted(paths)}: "
                                  f"params bitwise SRAdamW == DistributedOptimizer: {same}; losses equal: "
                                  f"{same_losses}; grad norms (SRAdamW, distributed) {norms[-1]}")


def time_step(device: str, hidden: int, layers: int) -> str:
    os.environ["MEGATRON_SR_FUSED"] = "1"
    ddp = DistributedDataParallel(build(hidden, layers, device), DDPConfig(grad_dtype=torch.bfloat16,
                                                                           use_distributed_optimizer=True))
    opt = DistributedOptimizer(ddp, OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=0.0), seed=SEED)
    ddp.buffer.grad_data.normal_(0, 1e-3)
    ddp._synced = True  # time the optimizer alone (no backward)
    for _ in range(3):
        path = opt.step().path
    if device == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    return (f"DistributedOptimizer.step() on {ddp.buffer.numel_unpadded / 1e6:.1f}M params, "
            f"{len(ddp.buffer.buckets)} buckets, path {path}: {ms:.2f} ms (norm + clip + SR AdamW)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="distributed-optimizer path vs non-distributed path on one GPU")
    ap.add_argument("--out", default="bench/results/distributed_gpu_check.txt")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_distributed: no CUDA device (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    lines = [f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}"]
    try:
        ps.initialize_model_parallel(1, 1)  # one-rank NCCL (or gloo) groups: dp = 1
        lines.append(f"parallel_state: dp={ps.get_data_parallel_world_size()} backend "
                     f"{torch.distributed.get_backend()}")
    except Exception as exc:  # noqa: BLE001  (the check below needs no group)
        lines.append(f"parallel_state init failed ({type(exc).__name__}: {exc}); running without groups")
    ok = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    hidden, layers = 256, 2
    for grad_dtype in (torch.bfloat16, torch.float32):
        a, la, pa, nb = run_distributed(hidden, layers, grad_dtype, args.device, fused=True)
        c, lc, pc, _ = run_distributed(hidden, layers, grad_dtype, args.device, fused=False)
        params, lb, pb = run_plain(hidden, layers, grad_dtype, args.device)
        same_ab = _bitwise(a, [q.detach() for q in params]) and la == lb
        same_ac = _bitwise(a, c) and la == lc
        if args.device == "cuda":
            ok &= pa == {"fused"} and pb == {"fused"} and pc == {"reference"}
        lines.append(f"grad {str(grad_dtype).split('.')[-1]}: {STEPS} steps, {nb} buckets; paths A={sorted(pa)} "
                     f"B={sorted(pb)} C={sorted(pc)}; A==B (distributed vs per-param) bitwise: {same_ab}; "
                     f"A==C (fused vs reference) bitwise: {same_ac}; losses A {la[0]:.6f} -> {la[-1]:.6f}")
        ok &= same_ab and same_ac
    gpt_ok, gpt_line = gpt_check(args.device)
    lines.append(gpt_line)
    ok &= gpt_ok
    lines.append(time_step(args.device, 1024 if args.device == "cuda" else 128, 8 if args.device == "cuda" else 1))
    lines.append("RESULT: " + ("PASS" if ok else "FAIL"))
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".tmp").write_text(text)
    os.replace(out.with_name(out.name + ".tmp"), out)
    print(text, end="")
    ps.destroy_model_parallel()
    return 0 if ok else 1


def _bitwise(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(xs, ys))


if __name__ == "__main__":
    raise SystemExit(main())
