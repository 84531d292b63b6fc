"""Megatron's logging options (issue 13): the log line's params norm, num zeros and timers, TensorBoard scalars
at --tensorboard-log-interval under Megatron's names, the --no-... switches, and Weights & Biases (a fake
module always, the real package in offline mode when it is installed).

The params norm and the zero count are checked against independent computations on the full tensors:
tensor-parallel slices gathered, and under the distributed optimizer the reduce-scattered gradient shards
gathered, so that no rule of "which rank counts what" is shared with the code under test.
"""

import glob
import json
import math
import re
import struct
import sys
import types

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks, sub_world

from megatron_sr.config import FLAGS, ConfigError, build_parser, parse_config
from megatron_sr.distributed import DistributedOptimizer
from megatron_sr.parallel import parallel_state as ps
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
        "--eval-iters 1 --lr 3e-3 --hidden-dropout 0 --attention-dropout 0 --micro-batch-size 2").split()
EVERY_FLAG = ("--log-params-norm --log-num-zeros-in-grad --log-throughput --timing-log-level 2 "
              "--log-timers-to-tensorboard --log-memory-to-tensorboard --log-world-size-to-tensorboard "
              "--log-validation-ppl-to-tensorboard").split()
TIMER_NAMES = ("forward-backward", "optimizer", "batch-generator")


# ---- independent computations over the full (unsharded, un-sliced) tensors ----

def _tp_full(param, tensor):
    """The whole tensor of a tensor-parallel slice (gathered over tp); a replicated tensor as it is."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def _reduced_grads(trainer) -> dict:
    """param -> its dp-reduced gradient, whole (the distributed optimizer's shards all-gathered)."""
    opt = trainer.optimizer
    if not isinstance(opt, DistributedOptimizer):
        return {p: p.grad for m in trainer.model_chunks for p in m.parameters()}
    ddp = opt.model
    ddp.finish_grad_sync()
    buf = ddp.buffer
    full = buf.grad_data.clone()
    if opt.shard and ddp.dp_size > 1:
        for bucket in buf.buckets:
            lo, hi = bucket.shard_range(ddp.dp_rank, ddp.dp_size)
            parts = [torch.empty(hi - lo, dtype=full.dtype) for _ in range(ddp.dp_size)]
            dist.all_gather(parts, buf.grad_data[lo:hi].clone(), group=ps.get_data_parallel_group())
            full[bucket.start:bucket.end] = torch.cat(parts)
    return {p: full[slice(*buf.param_range[p])].view(p.shape) for p in buf.params}


def _zero_count(trainer) -> int:
    return sum(int((_tp_full(p, g) == 0).sum()) for p, g in _reduced_grads(trainer).items())


def _params_norm(trainer) -> float:
    full = [_tp_full(p, p.detach()).double().flatten() for m in trainer.model_chunks for p in m.parameters()]
    return float(torch.linalg.vector_norm(torch.cat(full)))


class Recorder(Observer):
    """Records the log messages and, independently, every iteration's zero count and post-step params norm."""

    def __init__(self):
        self.lines, self.zeros, self.norms, self.trainer, self.final_norm = [], {}, {}, None, None

    def log(self, message: str) -> None:
        self.lines.append(message)

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_gradients(self, iteration, trainer) -> None:
        self.zeros[iteration] = _zero_count(trainer)

    def on_step(self, iteration, loss, result) -> None:
        self.norms[iteration] = _params_norm(self.trainer)

    def on_train_end(self, trainer, result) -> None:
        self.final_norm = _params_norm(trainer)

    def line(self, iteration: int) -> str:
        return next(m for m in self.lines if re.search(rf" iteration\s+{iteration}/", m))


def _field(line: str, name: str) -> str:
    return re.search(rf"\| {re.escape(name)}: ([^|]+) \|", line).group(1)


def _scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- one process, every flag on ----

@pytest.fixture(scope="module")
def every_flag_run(tmp_path_factory):
    tb = tmp_path_factory.mktemp("tb")
    argv = TINY + EVERY_FLAG + ["--global-batch-size", "4", "--train-iters", "6", "--log-interval", "3",
                                "--tensorboard-log-interval", "2", "--eval-interval", "3", "--tensorboard-dir", str(tb)]
    rec = Recorder()
    result = pretrain(parse_config(argv), rec)
    return rec, result, _scalars(tb)


def test_log_line_holds_params_norm_num_zeros_throughput_and_timers(every_flag_run):
    rec, _, _ = every_flag_run
    for it in (3, 6):
        message = rec.line(it)
        line, *timer_lines = message.splitlines()
        assert int(_field(line, "num zeros")) == rec.zeros[it]
        assert float(_field(line, "params norm")) == pytest.approx(rec.norms[it], abs=6e-4)
        assert float(_field(line, "throughput per GPU (TFLOP/s/GPU)")) >= 0 and "TFLOP/s per GPU:" not in line
        assert _field(line, "loss scale") == "1.0"
        assert timer_lines[0] == "(min, max) time across ranks (ms):"
        timers = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in
                  (re.match(r"\s+(\S+) \.+: \(([\d.]+), ([\d.]+)\)", ln) for ln in timer_lines[1:])}
        assert set(timers) == set(TIMER_NAMES)
        assert all(0 < lo <= hi for lo, hi in timers.values())  # one rank: min == max
    assert rec.final_norm == pytest.approx(rec.norms[6], rel=1e-12)


def test_tensorboard_scalars_at_the_tensorboard_interval_under_megatron_names(every_flag_run):
    rec, result, scalars = every_flag_run
    steps = [2, 4, 6]  # --tensorboard-log-interval 2 of 6 iterations
    for name in ("lm loss", "learning-rate", "batch-size", "loss-scale", "world-size", "grad-norm", "num-zeros",
                 "params-norm", "mem-max-rss-bytes"):
        assert [s for s, _ in scalars[name]] == steps, name
    for name in ("lm loss", "learning-rate", "batch-size", "grad-norm", "num-zeros", "params-norm"):
        assert [s for s, _ in scalars[f"{name} vs samples"]] == [4 * s for s in steps], name
    assert [v for _, v in scalars["lm loss"]] == pytest.approx([result.train_losses[s - 1] for s in steps], rel=1e-6)
    assert [v for _, v in scalars["num-zeros"]] == [rec.zeros[s] for s in steps]
    assert [v for _, v in scalars["params-norm"]] == pytest.approx([rec.norms[s] for s in steps], rel=1e-6)
    assert scalars["params-norm"][-1][1] == pytest.approx(rec.final_norm, rel=1e-6)
    assert {v for _, v in scalars["batch-size"]} == {4.0} and {v for _, v in scalars["loss-scale"]} == {1.0}
    assert {v for _, v in scalars["world-size"]} == {1.0}
    for name in [f"{t}-time" for t in TIMER_NAMES] + ["iteration-time", "throughput", "tokens-per-second"]:
        assert [s for s, _ in scalars[name]] == [3, 6], name  # at log lines
        assert all(v > 0 for _, v in scalars[name]), name
    (it3, v3), (it6, v6) = result.valid_losses
    assert scalars["lm loss validation"] == [(3, pytest.approx(v3, rel=1e-6)), (6, pytest.approx(v6, rel=1e-6))]
    assert [v for _, v in scalars["lm loss validation ppl"]] == pytest.approx([math.exp(v3), math.exp(v6)], rel=1e-5)
    assert "learning rate" not in scalars and "grad norm" not in scalars  # the old names are gone


def test_defaults_log_no_extras_and_no_loss_scale_switches_off(tmp_path):
    rec = Recorder()
    argv = TINY + ["--train-iters", "2", "--log-interval", "1", "--eval-interval", "2", "--tensorboard-dir",
                   str(tmp_path), "--no-log-loss-scale-to-tensorboard"]
    pretrain(parse_config(argv), rec)
    scalars = _scalars(tmp_path)
    assert {"lm loss", "learning-rate", "batch-size", "grad-norm", "tokens-per-second", "lm loss validation"} <= set(
        scalars)
    assert not {"loss-scale", "params-norm", "num-zeros", "world-size", "iteration-time", "lm loss validation ppl",
                "mem-max-rss-bytes", "forward-backward-time"} & set(scalars)
    assert [s for s, _ in scalars["lm loss"]] == [1, 2]
    line = rec.line(2)
    assert "\n" not in line and "params norm" not in line and "num zeros" not in line
    assert re.search(r"TFLOP/s per GPU: [\d.]+ \| MFU: n/a", line)


# ---- flags ----

def test_default_true_switches_are_spelled_no_flag():
    options = build_parser()._option_string_actions
    on_by_default = [name for name, (_, f, base) in FLAGS.items() if base is bool and f.default is True]
    assert {"log_loss_scale_to_tensorboard", "barrier_with_level_1_timing"} <= set(on_by_default)
    for name in on_by_default:
        flag = name.replace("_", "-")
        assert f"--no-{flag}" in options and f"--{flag}" not in options, name
    cfg = parse_config(TINY + ["--tensorboard-dir", "tb", "--no-log-loss-scale-to-tensorboard"])
    assert cfg.training.log_loss_scale_to_tensorboard is False
    assert parse_config(TINY).training.log_loss_scale_to_tensorboard is True


def test_yaml_key_of_a_no_flag_is_the_field_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("log-loss-scale-to-tensorboard: false\ntensorboard-dir: tb\n")
    assert parse_config(TINY + ["--config", str(f)]).training.log_loss_scale_to_tensorboard is False


@pytest.mark.parametrize("argv, note", [
    (["--log-memory-to-tensorboard"], "--log-memory-to-tensorboard: no --tensorboard-dir or --wandb-project, so no "
                                      "scalars are written"),
    (["--no-log-loss-scale-to-tensorboard"], "--no-log-loss-scale-to-tensorboard: no --tensorboard-dir"),
    (["--timing-log-option", "all"], "--timing-log-level 0 has no timers, nothing to change"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name: no --wandb-project, so no wandb run"),
])
def test_logging_flags_with_nothing_to_act_on_are_noted(argv, note):
    """Megatron accepts them and does nothing; here the start-up log says so (a script runs unchanged)."""
    assert any(note in n for n in parse_config(TINY + argv).notes)


@pytest.mark.parametrize("argv, message", [
    (["--tensorboard-log-interval", "0", "--tensorboard-dir", "tb"], "--tensorboard-log-interval must be positive"),
    (["--timing-log-level", "3"], "--timing-log-level must be 0, 1 or 2"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-exp-name"),
    (["--wandb-project", "p", "--wandb-exp-name", "e"], "--wandb-project needs --wandb-save-dir or --save"),
    (["--log-learning-rate-to-tensorboard"], "--log-learning-rate-to-tensorboard"),  # not a Megatron flag (any more)
])
def test_logging_flag_errors_are_one_line(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(TINY + argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wandb_flag_without_the_package_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"--wandb-project needs the wandb package: pip install wandb"):
        parse_config(TINY + ["--wandb-project", "p", "--wandb-exp-name", "e", "--wandb-save-dir", str(tmp_path)])


# ---- Weights & Biases ----

def _fake_wandb():
    fake = types.ModuleType("wandb")
    fake.inits, fake.logged, fake.finished = [], [], 0

    def finish():
        fake.finished += 1

    fake.init = lambda **kwargs: fake.inits.append(kwargs)
    fake.log = lambda data, step=None: fake.logged.append((step, data))
    fake.finish = finish
    return fake


def test_wandb_gets_the_run_and_the_scalars(monkeypatch, tmp_path):
    fake = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    save_dir = tmp_path / "wb"
    argv = TINY + ["--train-iters", "4", "--log-interval", "2", "--tensorboard-log-interval", "2", "--eval-interval",
                   "4", "--wandb-project", "proj", "--wandb-exp-name", "run1", "--wandb-save-dir", str(save_dir),
                   "--log-params-norm", "--log-validation-ppl-to-tensorboard"]
    result = pretrain(parse_config(argv), Recorder())
    (init,) = fake.inits
    assert (init["project"], init["name"], init["dir"]) == ("proj", "run1", str(save_dir)) and save_dir.is_dir()
    assert init["config"]["training"]["wandb_exp_name"] == "run1" and fake.finished == 1
    by_name = {}
    for step, data in fake.logged:
        (name, value), = data.items()
        by_name.setdefault(name, []).append((step, value))
    assert [s for s, _ in by_name["lm loss"]] == [2, 4]
    assert [v for _, v in by_name["lm loss"]] == pytest.approx([result.train_losses[1], result.train_losses[3]])
    assert [s for s, _ in by_name["params-norm"]] == [2, 4] and [s for s, _ in by_name["learning-rate"]] == [2, 4]
    assert by_name["lm loss validation"] == [(4, pytest.approx(result.valid_losses[-1][1]))]
    assert "lm loss validation ppl" in by_name
    assert not any(" vs samples" in name for name in by_name)  # the samples axis is TensorBoard's only
    steps = [s for s, _ in fake.logged]
    assert steps == sorted(steps)  # wandb drops a step lower than one already logged


def _wandb_history(run_file: str) -> dict[str, list[tuple[int, float]]]:
    """The history rows of an offline run file (LevelDB-style log of protobuf Records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, part, out = open(run_file, "rb").read(), 7, 32768, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record = pb.Record()
        record.ParseFromString(part)
        part = b""
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return out


def test_real_wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no console capture: under pytest's own capture it lost the history
    argv = TINY + ["--train-iters", "2", "--log-interval", "1", "--eval-interval", "0",
                   "--wandb-project", "proj", "--wandb-exp-name", "offline1", "--save", str(tmp_path / "ck")]
    result = pretrain(parse_config(argv), Recorder())
    (run_file,) = glob.glob(str(tmp_path / "ck" / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = _wandb_history(run_file)
    assert "lm loss" in history, sorted(history)
    assert [s for s, _ in history["lm loss"]] == [1, 2]
    assert [v for _, v in history["lm loss"]] == pytest.approx(result.train_losses, rel=1e-6)


# ---- two gloo ranks: tp 2, and dp 2 with the distributed optimizer ----

def _two_layouts(tb_root: str):
    out = {}
    for tag, extra in (("tp2", ["--tensor-model-parallel-size", "2"]),
                       ("dp2", ["--use-distributed-optimizer", "--ddp-bucket-size", "3000"])):
        with sub_world(2, tag) as active:
            if active:
                rec = Recorder()
                argv = TINY + EVERY_FLAG + extra + ["--train-iters", "4", "--log-interval", "2", "--eval-interval",
                                                    "0", "--global-batch-size", "4", "--timing-log-option", "all",
                                                    "--tensorboard-dir", f"{tb_root}/{tag}"]
                pretrain(parse_config(argv), rec)
                out[tag] = {"lines": {it: rec.line(it) for it in (2, 4)}, "zeros": rec.zeros, "norms": rec.norms}
    return out


@pytest.mark.slow
def test_params_norm_and_zeros_under_tp2_and_sharded_dp2(tmp_path):
    ranks = run_ranks(2, _two_layouts, str(tmp_path))
    for tag in ("tp2", "dp2"):
        zeros, norms = ranks[0][tag]["zeros"], ranks[0][tag]["norms"]
        assert zeros == ranks[1][tag]["zeros"]  # the independent checks agree across ranks
        assert list(norms.values()) == pytest.approx(list(ranks[1][tag]["norms"].values()), rel=1e-12)
        for it in (2, 4):
            for rank in (0, 1):
                line = ranks[rank][tag]["lines"][it]
                first = line.splitlines()[0]
                assert int(_field(first, "num zeros")) == zeros[it], (tag, rank, first)
                assert float(_field(first, "params norm")) == pytest.approx(norms[it], abs=6e-4), (tag, rank, first)
                assert "times across ranks (ms):" in line and "rank  1:" in line
        timers = set(re.findall(r"^  (\S+):$", ranks[0][tag]["lines"][4], re.M))
        assert set(TIMER_NAMES) | {"all-grads-sync", "params-all-gather"} <= timers, (tag, timers)
        assert len(list((tmp_path / tag).glob("events.out.tfevents.*"))) == 1  # the last rank writes, alone
        scalars = _scalars(tmp_path / tag)
        assert [v for _, v in scalars["num-zeros"]] == [zeros[it] for it in (1, 2, 3, 4)]
        assert [v for _, v in scalars["params-norm"]] == pytest.approx([norms[it] for it in (1, 2, 3, 4)], rel=1e-6)
