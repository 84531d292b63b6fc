"""tools/estimate_memory.py against the real tensors on the CPU.

1. Params, grads and optimizer states: exactly `memory_bytes()` of the trainer's SRAdamW (world size 1,
   after a forward/backward) and of DDP + DistributedOptimizer on gloo ranks (dp 1, 2, 4, with and
   without --use-distributed-optimizer, every rank), for each precision mode.
2. Activations: exactly the bytes of the tensors autograd saves for backward on the CPU (saved-tensor
   hooks, deduplicated by storage, parameters excluded), one layer and the whole model, with the
   estimator's CPU profile. The CUDA profile differs only where the devices store different tensors
   (LayerNorm statistics, dropout masks, attention with dropout > 0), and that difference is checked
   term by term. BF16 runs without model/cpu_bf16.py's FP32-GEMM mode (a CPU-only path that saves FP32
   copies of the GEMM operands), so F.linear saves what it saves on a GPU.
3. --fit and --largest: sensible and monotone answers. 4. CLI errors: one line naming the flag, exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks, sub_world

from megatron_sr.config import parse_config
from megatron_sr.model import GPTModel
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.parallel.random import model_parallel_seed

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "estimate_memory.py"

# Tiny, with sizes that leave bucket padding at dp 2 and 4 (hidden 48, vocab 100 -> 128, ffn 192).
TINY = ["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "100", "--mock-data", "--device", "cpu"]
MODES = {  # name -> the precision flags
    "bf16-sr": ["--precision", "bf16-sr"],
    "bf16-sr-bf16-states": ["--precision", "bf16-sr", "--optimizer-state-dtype", "bf16"],
    "bf16-sr-fp32-grads": ["--precision", "bf16-sr", "--grad-dtype", "fp32"],
    "bf16-mp": ["--precision", "bf16-mp"],
    "bf16": ["--precision", "bf16"],
    "fp32": ["--precision", "fp32"],
}
STATE_KEYS = ("params", "grads", "optimizer_states", "num_params")


def _tool():
    if "estimate_memory" in sys.modules:
        return sys.modules["estimate_memory"]
    spec = importlib.util.spec_from_file_location("estimate_memory", _TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimate_memory"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


em = _tool()


def _dims(argv: list[str], world_size: int = 1):
    with em.world_size_env(world_size):
        cfg = parse_config(argv)
    return cfg, em.dims_from_config(cfg, world_size)


# ---- 1. model states ----

@pytest.mark.parametrize("extra", [[], ["--untie-embeddings-and-output-weights", "--swiglu",
                                        "--position-embedding-type", "rope", "--disable-bias-linear"]])
def test_parameter_list_is_the_models(extra):
    cfg, d = _dims(TINY + extra)
    model = GPTModel(cfg.model, params_dtype=torch.bfloat16)
    assert em.stage_params(d, 0) == [(n, p.numel()) for n, p in model.named_parameters()]
    assert em.num_parameters(d) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_world_size_1_states_equal_sradamw(mode):
    from megatron_sr.training.setup import build

    cfg, d = _dims(TINY + MODES[mode])
    trainer = build(cfg)
    model = trainer.model_chunks[0]
    tokens = torch.randint(0, 100, (2, 17))
    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()  # the grads (or main grads) now exist
    real = trainer.optimizer.memory_bytes()
    est = em.model_state_bytes(d)
    assert {k: est[k] for k in STATE_KEYS} == real


def _dp_states_body() -> list[tuple]:
    """On each rank of sub-worlds 1, 2, 4: (dp, rank, mode, sharded, real memory_bytes, estimate)."""
    from megatron_sr.distributed import build_data_parallel
    from megatron_sr.optimizer.sr_streams import assign_sr_streams

    tool, out = _tool(), []
    for dp in (1, 2, 4):
        with sub_world(dp, f"states{dp}") as active:
            if not active:
                continue
            ps.initialize_model_parallel(1, 1)
            for mode, flags in MODES.items():
                for sharded in (False, True):
                    argv = TINY + flags + ["--ddp-bucket-size", "5000"] + (["--use-distributed-optimizer"]
                                                                           if sharded else [])
                    with tool.world_size_env(dp):
                        cfg = parse_config(argv)
                    d = tool.dims_from_config(cfg, dp)
                    model = GPTModel(cfg.model, params_dtype=tool.precision_mode(cfg.optimizer.precision).param_dtype)
                    assign_sr_streams([model])
                    _, opt = build_data_parallel(model, cfg.optimizer, seed=1, use_distributed_optimizer=sharded,
                                                 bucket_size=cfg.parallel.ddp_bucket_size)
                    est = tool.model_state_bytes(d, 0, ps.get_data_parallel_rank())
                    out.append((dp, ps.get_data_parallel_rank(), mode, sharded, opt.memory_bytes(),
                                {k: est[k] for k in STATE_KEYS}, len(opt.model.buffer.buckets)))
    return out


# (tp, pp, dp, flags): model-parallel layouts through the trainer's own assembly (training/setup.build)
LAYOUTS = [(2, 1, 1, ["--precision", "fp32", "--hidden-dropout", "0.1", "--attention-dropout", "0.0"]),
           (2, 1, 1, ["--precision", "fp32", "--sequence-parallel", "--hidden-dropout", "0.1",
                      "--untie-embeddings-and-output-weights", "--swiglu"]),
           (2, 1, 2, ["--precision", "bf16-mp", "--sequence-parallel", "--recompute-activations",
                      "--use-distributed-optimizer"]),
           (2, 2, 1, ["--precision", "bf16-sr", "--position-embedding-type", "rope"]),  # pp > 1: tied only
           (1, 2, 2, ["--precision", "bf16-sr", "--use-distributed-optimizer"])]


def _layouts_body() -> list[tuple]:
    """Per layout and rank: the stage's parameter list, memory_bytes() and (pp 1) the activations saved by the
    trainer's forward step, each next to the estimate."""
    import megatron_sr.model.gpt as gpt
    import megatron_sr.model.transformer as transformer
    from megatron_sr.training.forward_backward import get_batch, loss_func
    from megatron_sr.training.setup import build

    tool, out = _tool(), []
    transformer.cpu_bf16_matmul = gpt.cpu_bf16_matmul = lambda x: contextlib.nullcontext()  # a child process
    for i, (tp, pp, dp, flags) in enumerate(LAYOUTS):
        with sub_world(tp * pp * dp, f"layout{i}") as active:
            if not active:
                continue
            argv = TINY + flags + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
                                   str(pp), "--ddp-bucket-size", "5000", "--micro-batch-size", "2"]
            cfg = parse_config(argv)  # WORLD_SIZE is the sub-world's
            d = tool.dims_from_config(cfg, tp * pp * dp)
            trainer = build(cfg)
            model = trainer.model_chunks[0]
            pp_rank, dp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()
            est = tool.model_state_bytes(d, pp_rank, dp_rank)
            row = [i, dist_rank(), [(n, q.numel()) for n, q in model.named_parameters()],
                   tool.stage_params(d, pp_rank), trainer.optimizer.memory_bytes(), {k: est[k] for k in STATE_KEYS}]
            if pp == 1:
                torch.manual_seed(0)  # the same tokens on every rank
                batch = get_batch(iter([{"tokens": torch.randint(0, 100, (2, 17))}]), torch.device("cpu"))
                positions = torch.arange(16).expand(2, -1)

                def step(model=model, batch=batch, positions=positions):
                    loss = model(batch["tokens"], position_ids=positions, labels=batch["labels"])
                    return loss_func(loss, batch["loss_mask"])[0]

                row += [_saved_bytes(step, model.parameters()), sum(tool.saved_bytes(d, 0, tool.CPU).values())]
            out.append(tuple(row))
    return out


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _all_bodies() -> tuple[list, list]:
    return _dp_states_body(), _layouts_body()


@pytest.mark.slow
def test_data_parallel_states_equal_ddp_buffers_on_every_rank(parallel_results):
    rows = [row for per_rank, _ in parallel_results for row in per_rank]
    assert len(rows) == (1 + 2 + 4) * len(MODES) * 2
    for dp, rank, mode, sharded, real, est, buckets in rows:
        assert buckets > 1, "the test should cover several buckets"
        assert est == real, (dp, rank, mode, sharded)
    # the padding and the sharding are visible: dp 4 shards hold fewer real elements on the last rank
    states = {(dp, rank, mode, sharded): real["optimizer_states"] for dp, rank, mode, sharded, real, *_ in rows}
    assert states[(4, 3, "bf16-sr", True)] < states[(4, 0, "bf16-sr", True)] < states[(4, 0, "bf16-sr", False)]


@pytest.fixture(scope="module")
def parallel_results():
    return run_ranks(4, _all_bodies)


@pytest.mark.slow
def test_model_parallel_layouts_equal_the_trainer(parallel_results):
    rows = [row for _, per_rank in parallel_results for row in per_rank]
    assert sorted({row[0] for row in rows}) == list(range(len(LAYOUTS)))
    for layout, rank, real_params, est_params, real, est, *acts in rows:
        assert est_params == real_params, (LAYOUTS[layout], rank)
        assert est == real, (LAYOUTS[layout], rank)
        if acts:  # tp 2 with and without sequence parallelism: the saved activations, exactly
            assert acts[0] == acts[1], (LAYOUTS[layout], rank)


# ---- 2. activations vs the tensors autograd saves ----

@contextlib.contextmanager
def _gpu_like_linear(monkeypatch):
    """BF16 F.linear as on a GPU (cpu_bf16's FP32-GEMM mode saves FP32 copies of its operands)."""
    import megatron_sr.model.gpt as gpt
    import megatron_sr.model.transformer as transformer

    monkeypatch.setattr(transformer, "cpu_bf16_matmul", lambda x: contextlib.nullcontext())
    monkeypatch.setattr(gpt, "cpu_bf16_matmul", lambda x: contextlib.nullcontext())
    yield


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert out.requires_grad
    return sum(seen.values())


RECOMPUTE = {"none": [], "selective": ["--recompute-granularity", "selective"],
             "uniform1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                          "--recompute-num-layers", "1"],
             "block1": ["--recompute-granularity", "full", "--recompute-method", "block",
                        "--recompute-num-layers", "1"]}
SHAPE = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--vocab-size", "200", "--micro-batch-size", "2", "--mock-data"]


def _model(argv: list[str]):
    cfg, d = _dims(argv)
    dtype = em.precision_mode(cfg.optimizer.precision).param_dtype
    model = GPTModel(cfg.model, params_dtype=dtype).train()
    model_parallel_seed(1)
    return cfg, d, model, dtype


def _measured(argv: list[str]) -> tuple[int, int, object]:
    """(saved by the layers of the model alone, saved by the trainer's forward step, Dims)."""
    from megatron_sr.training.forward_backward import get_batch, loss_func

    cfg, d, model, dtype = _model(argv)
    b, s, h = cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.hidden_size
    positions = torch.arange(s).expand(b, -1)  # as make_forward_backward: one storage of s int64
    x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
    layers = _saved_bytes(lambda: model._run_layers(x, positions), model.parameters())
    batch = get_batch(iter([{"tokens": torch.randint(0, 200, (b, s + 1))}]), torch.device("cpu"))

    def step():
        out = model(batch["tokens"], position_ids=positions, labels=batch["labels"])
        return loss_func(out, batch["loss_mask"])[0]

    return layers, _saved_bytes(step, model.parameters()), d


CASES = [(r, p, dt) for r in RECOMPUTE for p in ("0.0", "0.1") for dt in ("fp32", "bf16-sr")]


@pytest.mark.parametrize("recompute,dropout,precision", CASES)
def test_activations_equal_saved_tensors(recompute, dropout, precision, monkeypatch):
    argv = SHAPE + RECOMPUTE[recompute] + ["--precision", precision, "--hidden-dropout", dropout,
                                           "--attention-dropout", dropout]
    with _gpu_like_linear(monkeypatch):
        layers, whole, d = _measured(argv)
    full = d.recompute in ("uniform", "block")
    assert layers == em.layers_saved(d, em.CPU) + (d.seq * 8 if full else 0)  # the checkpoint's position ids
    assert whole == sum(em.saved_bytes(d, 0, em.CPU).values())
    if recompute == "none":  # one layer, term by term
        assert layers == d.layers * em.layer_bytes(d, em.CPU)


@pytest.mark.parametrize("extra", [["--swiglu"], ["--position-embedding-type", "rope"],
                                   ["--position-embedding-type", "rope", "--recompute-activations"],
                                   ["--untie-embeddings-and-output-weights", "--disable-bias-linear"]])
@pytest.mark.parametrize("dropout", ["0.0", "0.1"])
def test_activations_of_variants_equal_saved_tensors(extra, dropout, monkeypatch):
    argv = SHAPE + extra + ["--precision", "bf16-sr", "--hidden-dropout", dropout, "--attention-dropout", dropout]
    with _gpu_like_linear(monkeypatch):
        layers, whole, d = _measured(argv)
    assert layers == em.layers_saved(d, em.CPU)
    assert whole == sum(em.saved_bytes(d, 0, em.CPU).values())


@pytest.mark.parametrize("precision", ["fp32", "bf16-sr"])
def test_plain_logits_loss_terms_equal_saved_tensors(precision, monkeypatch):
    """The plain [tokens, vocab] path (parallel_lm_logits + vocab_parallel_cross_entropy), which the
    estimator models for a config without the chunked loss."""
    from megatron_sr.parallel.layers import parallel_lm_logits, vocab_parallel_cross_entropy

    cfg, d, model, dtype = _model(SHAPE + ["--precision", precision])
    d = dataclasses.replace(d, chunked_loss=False, loss_chunk_tokens=0, pp=1)
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    h = torch.randn(b, s, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 200, (b, s))
    mask = torch.ones(b, s)

    def head():
        logits = parallel_lm_logits(model.final_layernorm(h), model.output_weight())
        return (vocab_parallel_cross_entropy(logits, labels) * mask).sum() / mask.sum()

    terms = em.head_terms(d, em.CPU)
    assert _saved_bytes(head, model.parameters()) == sum(terms.values())
    assert terms["loss"] == b * s * d.padded_vocab * 4 + b * s * 8 + 4


def test_cuda_profile_differs_from_cpu_only_where_the_devices_store_differently():
    _, d = _dims(SHAPE + ["--precision", "bf16-sr", "--hidden-dropout", "0.1", "--attention-dropout", "0.0"])
    cpu, cuda = em.layer_terms(d, em.CPU), em.layer_terms(d, em.CUDA)
    tokens = d.micro_batch * d.seq
    assert cuda["ln1"] - cpu["ln1"] == 2 * tokens * (4 - 2)  # FP32 mean/rstd on CUDA, BF16 on the CPU
    assert cpu["mlp_dropout_mask"] - cuda["mlp_dropout_mask"] == tokens * d.hidden * (2 - 1)  # bool vs BF16 noise
    same = {"qkv_input", "qkv", "attention_core", "fc1_input", "mlp"}
    assert {k: cpu[k] for k in same} == {k: cuda[k] for k in same}
    # the paper's 34 s b h at 16 bit, plus what it leaves out (the FP32 statistics and logsumexp)
    _, d = _dims(["--num-layers", "1", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length",
                  "2048", "--micro-batch-size", "2", "--vocab-size", "1000", "--mock-data"])
    sbh = d.seq * d.micro_batch * d.hidden
    extra = 2 * 2 * d.seq * d.micro_batch * 4 + d.micro_batch * d.heads * d.seq * 4
    assert em.layer_bytes(d, em.CUDA) == 34 * sbh + extra
    # with dropout > 0 the CPU takes the math path and stores the a s^2 scores (FP32: 3 x 4 B where the paper
    # counts 5 B at 16 bit); flash on CUDA does not
    _, d = _dims(SHAPE + ["--attention-dropout", "0.1"])
    scores = 3 * d.micro_batch * d.heads * d.seq * d.seq * 4
    assert em.layer_terms(d, em.CPU)["attention_core"] >= scores > em.layer_terms(d, em.CUDA)["attention_core"]


def test_recompute_and_pipeline_order_the_peaks():
    base = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "1024",
            "--micro-batch-size", "4", "--vocab-size", "50257", "--mock-data"]
    peaks = [em.estimate(_dims(base + RECOMPUTE[r])[1])["total"] for r in ("none", "selective", "block1", "uniform1")]
    assert peaks[0] >= peaks[1] > peaks[2] > peaks[3]
    # 1F1B: stage 0 keeps pp micro-batches, the last stage one
    _, d = _dims(base + ["--pipeline-model-parallel-size", "4", "--global-batch-size", "64"], world_size=4)
    assert [em.activation_peak(d, r)["in_flight"] for r in range(4)] == [4, 3, 2, 1]
    # the chunked loss shrinks the logits term, the more the smaller its chunks
    d = _dims(base)[1]
    plain = em.estimate(dataclasses.replace(d, chunked_loss=False, loss_chunk_tokens=0))
    one, chunked = (em.estimate(dataclasses.replace(d, chunked_loss=True, loss_chunk_tokens=c)) for c in (0, 1024))
    assert chunked["logits_loss"] < one["logits_loss"] < plain["logits_loss"]
    # (not by much more at this size: the FP32 [vocab, h] weight-grad accumulator, and on CUDA lm_loss.py's
    # BF16 chunk GEMM and its FP32 cast, 10 B x vocab x h, dominate the chunked backward)
    assert chunked["logits_loss"] < plain["logits_loss"] / 2 and chunked["total"] < plain["total"]


# ---- 3. --fit and --largest ----

def _report(argv: list[str]) -> dict:
    return em.run(argv + ["--json"])[0]


GPT_1B = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "1024",
          "--micro-batch-size", "8", "--vocab-size", "50257"]


def test_fit_is_monotone():
    small, large = (_report(GPT_1B + ["--fit", str(g)])["modes"] for g in (40, 80))
    for rows in (small, large):
        by_mode = {r["mode"]: r for r in rows}
        for r in rows:
            by = list(r["largest_micro_batch_by_recompute"].values())
            assert by == sorted(by) and r["largest_micro_batch"] == by[-1] >= 1  # more recompute, larger batches
        mbs = {m: r["largest_micro_batch"] for m, r in by_mode.items()}
        none = {m: r["largest_micro_batch_by_recompute"]["none"] for m, r in by_mode.items()}
        for sizes in (mbs, none):
            assert sizes["bf16-sr (BF16 states)"] >= sizes["bf16-sr (FP32 states)"] >= sizes["bf16-mp"]
            assert sizes["bf16"] == sizes["bf16-sr (FP32 states)"]  # the same bytes
    for a, b in zip(small, large):
        assert b["largest_micro_batch"] >= a["largest_micro_batch"]
    assert large[0]["least_recompute_at_configured"] == "none"  # 1.3B at micro-batch 8 fits 80 GiB as is


def test_largest_is_monotone_and_fast():
    import time

    start = time.perf_counter()
    rep = _report(["--seq-length", "2048", "--vocab-size", "50257", "--largest", "139"])
    assert time.perf_counter() - start < 10
    params = {r["mode"]: r["largest"]["num_params"] for r in rep["modes"]}
    assert params["bf16-sr (BF16 states)"] > params["bf16-sr (FP32 states)"] > params["bf16-mp"]
    assert params["bf16"] == params["bf16-sr (FP32 states)"]
    # roughly budget / bytes per parameter: 139 GiB / 12 B (bf16-sr), / 8 B (BF16 states), / 18 B (bf16-mp)
    for mode, per_param in (("bf16-sr (FP32 states)", 12), ("bf16-sr (BF16 states)", 8), ("bf16-mp", 18)):
        assert 0.8 < params[mode] * per_param / (139 * em.GIB) <= 1.0, mode
    for r in rep["modes"]:
        assert r["largest"]["total_bytes"] <= 139 * em.GIB
    smaller = _report(["--seq-length", "2048", "--vocab-size", "50257", "--largest", "40"])["modes"]
    assert all(s["largest"]["num_params"] <= r["largest"]["num_params"] for s, r in zip(smaller, rep["modes"]))
    # the model-parallel layout shards the states: tp 8 trains a much larger model per GPU
    tp8 = _report(["--seq-length", "2048", "--vocab-size", "50257", "--largest", "139",
                   "--tensor-model-parallel-size", "8", "--sequence-parallel"])["modes"]
    assert tp8[0]["largest"]["num_params"] > 5 * params["bf16-sr (FP32 states)"]


def test_default_breakdown_adds_up():
    rep = _report(GPT_1B)
    parts = ("params", "grads", "optimizer_states", "activations", "logits_loss", "allowance")
    for est in (rep["config"], *rep["modes"].values()):
        assert sum(est[k] for k in parts) == est["total"]
    n = rep["num_params"]
    assert rep["modes"]["bf16-sr (FP32 states)"]["optimizer_states"] == 8 * n
    assert rep["modes"]["bf16-sr (BF16 states)"]["optimizer_states"] == 4 * n
    assert rep["modes"]["bf16-mp"]["optimizer_states"] == 12 * n and rep["modes"]["bf16-mp"]["grads"] == 4 * n


# ---- 4. the command line ----

@pytest.mark.parametrize("argv,flag", [
    (["--fit", "-3"], "--fit"), (["--largest", "x"], "--largest"), (["--world-size", "0"], "--world-size"),
    (["--loss-chunk-tokens", "-1"], "--loss-chunk-tokens"), (["--hidden-size", "100"], "--hidden-size"),
    (["--tensor-model-parallel-size", "2", "--world-size", "3"], "world size"), (["--bogus"], "--bogus"),
    (["--fit", "10", "--largest", "10"], "--largest"), (["--precision", "fp16"], "precision"),
])
def test_cli_errors_are_one_line_naming_the_flag(argv, flag, capsys):
    assert em.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("estimate_memory: ") and flag in err, err


def test_cli_prints_json_and_text(capsys):
    assert em.main(GPT_1B + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_params"] > 1e9
    for extra in ([], ["--fit", "80"], ["--largest", "80"]):
        assert em.main(GPT_1B + extra) == 0
        assert "bf16-sr (BF16 states)" in capsys.readouterr().out


def test_cli_runs_as_a_script():
    bad = subprocess.run([sys.executable, str(_TOOL), "--fit", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--fit" in bad.stderr, bad.stderr
