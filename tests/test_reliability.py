"""Never lose a checkpoint, never save a broken model, never run on a wrong config in silence (issue 11)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sr.checkpoint.layout import recover_directory
from megatron_sr.config import ConfigError, parse_config
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain
from megatron_sr.training.setup import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY = ("--mock-data --vocab-size 128 --num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
        "--micro-batch-size 2 --log-interval 1 --eval-interval 0 --eval-iters 1 --lr 3e-3 --device cpu").split()


class Recorder(Observer):
    def __init__(self):
        self.lines = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def run(*flags, observer=None):
    return pretrain(parse_config(TINY + list(flags)), observer or Recorder())


def digest(root: Path) -> str:
    """Every file under a checkpoint root, names and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def saved(tmp_path):
    """A real run's checkpoint root at iteration 4 (saves at 2 and 4)."""
    root = tmp_path / "ckpt"
    run("--train-iters", "4", "--save", str(root), "--save-interval", "2")
    return root


@pytest.mark.parametrize("load", [None, "typo", "file"])
def test_a_wrong_load_never_overwrites_the_checkpoint_in_save(saved, tmp_path, load):
    before = digest(saved)
    flags = ["--train-iters", "2", "--save", str(saved)]
    if load == "typo":
        flags += ["--load", str(tmp_path / "ckpt_typo")]
    elif load == "file":
        (tmp_path / "a_file").write_text("x")
        flags += ["--load", str(tmp_path / "a_file")]
    with pytest.raises(ValueError, match="is a file" if load == "file" else "--overwrite-checkpoints"):
        run(*flags)
    assert digest(saved) == before


def test_resuming_elsewhere_never_moves_a_later_latest_back(saved, tmp_path):
    other = tmp_path / "other"
    run("--train-iters", "2", "--save", str(other))
    before = digest(saved)
    with pytest.raises(ValueError, match="holds iteration 4, later than iteration 2"):
        run("--train-iters", "3", "--load", str(other), "--save", str(saved))
    assert digest(saved) == before


def test_overwrite_checkpoints_is_the_explicit_way_to_start_over(saved):
    result = run("--train-iters", "2", "--save", str(saved), "--overwrite-checkpoints")
    assert result.state.iteration == 2 and (saved / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_interrupted_saves_are_cleaned_up_and_an_interrupted_replace_is_restored(saved):
    (saved / ".iter_0000006.tmp").mkdir()
    (saved / "latest_checkpointed_iteration.txt.tmp").write_text("6")
    (saved / "iter_0000004").rename(saved / ".iter_0000004.old")  # killed between the two renames of a re-save
    rec = Recorder()
    result = run("--train-iters", "5", "--load", str(saved), "--save", str(saved), observer=rec)
    assert result.state.iteration == 5 and any("restored" in line for line in rec.lines)
    assert not [p.name for p in saved.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert recover_directory(saved) == []


def test_resuming_a_different_model_is_one_line_naming_the_field(saved):
    with pytest.raises(ValueError, match=r"--num-attention-heads 2 -> 4"):
        run("--train-iters", "6", "--load", str(saved), "--save", str(saved), "--num-attention-heads", "4")
    rec = Recorder()
    run("--train-iters", "6", "--load", str(saved), "--save", str(saved), "--lr", "1e-3", observer=rec)
    assert any("changed settings" in line and "--lr 0.003 -> 0.001" in line for line in rec.lines)


def test_all_nan_training_stops_without_saving(tmp_path):
    with pytest.raises(TrainingDiverged, match="in a row had NaN/Inf"):
        run("--train-iters", "20", "--save", str(tmp_path / "c"), "--save-interval", "5",
            "--init-method-std", "1e30", "--max-consecutive-skips", "3")
    assert not (tmp_path / "c" / "latest_checkpointed_iteration.txt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    class Poison(Observer):  # finite gradients, but the weights go bad (as an overflowing update would)
        def log(self, message):
            pass

        def on_step(self, iteration, loss, result):
            if iteration == 2:
                with torch.no_grad():
                    next(self.model.parameters()).view(-1)[0] = float("nan")

        def on_train_start(self, trainer):
            self.model = trainer.model_chunks[0]

    with pytest.raises(TrainingDiverged, match="weights hold NaN/Inf"):
        run("--train-iters", "4", "--save", str(tmp_path / "c"), "--save-interval", "1", observer=Poison())
    assert (tmp_path / "c" / "latest_checkpointed_iteration.txt").read_text() == "1"


@pytest.mark.parametrize("yaml_text, message", [
    ("num-layers: 2.7\n", "num-layers expects int, got 2.7"),
    ("train-iters: true\n", "train-iters expects int, got True"),
    ("num-layers: null\n", "num-layers needs a value"),
])
def test_yaml_values_are_never_truncated_or_guessed(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(path), "--mock-data"])


@pytest.mark.parametrize("flags, message", [
    ("--lr nan", "--lr must be a finite number"), ("--lr inf", "--lr must be a finite number"),
    ("--lr -0.001 --min-lr -0.01", r"--lr must be in \[0, inf\)"),
    ("--adam-beta1 1.5", r"--adam-beta1 must be in \[0, 1\)"),
    ("--clip-grad -1", "--clip-grad must be in"), ("--weight-decay -5", "--weight-decay must be in"),
    ("--adam-eps 0", r"--adam-eps must be in \(0, inf\)"), ("--max-consecutive-skips -1", "must be >= 0"),
])
def test_out_of_range_values_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TINY + flags.split())


def test_unwritable_save_is_found_before_training(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--save .*is a file"):
        run("--train-iters", "2", "--save", str(tmp_path / "f"))
    with pytest.raises(ValueError, match="--tensorboard-dir .*is a file"):
        run("--train-iters", "2", "--tensorboard-dir", str(tmp_path / "f"))


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "-5"), ("--temperature", "-1"), ("--top-k", "-3")])
def test_generate_refuses_negative_settings(flag, value):
    proc = subprocess.run([sys.executable, "tools/generate.py", "--load", "x", flag, value], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"{flag} must be >= 0" in proc.stderr


def test_generate_refuses_a_non_finite_checkpoint(saved):
    path = saved / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=False)
    payload["model"]["decoder.0.mlp.linear_fc1.weight"].fill_(float("nan"))
    torch.save(payload, path)
    proc = subprocess.run([sys.executable, "tools/generate.py", "--load", str(saved)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "non-finite weights" in proc.stderr and "Traceback" not in proc.stderr


def test_a_truncated_checkpoint_names_the_file_and_the_previous_iteration(saved):
    path = saved / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model_optim_rng.pt: unreadable checkpoint file.*iter_0000002"):
        run("--train-iters", "6", "--load", str(saved), "--save", str(saved))


def test_degenerate_splits_are_an_error(tmp_path):
    from data_helpers import write_synthetic

    write_synthetic(str(tmp_path / "d"), [200] * 20, vocab=128)
    flags = ["--data-path", str(tmp_path / "d"), "--vocab-size", "128", "--train-iters", "2"]
    argv = [a for a in TINY if a != "--mock-data"] + flags
    with pytest.raises(ValueError, match="--split 0,100,0: the training split holds no samples"):
        pretrain(parse_config(argv + ["--split", "0,100,0"]), Recorder())
    with pytest.raises(ValueError, match=f"--split 100,0,0 leaves the validation split of --data-path {tmp_path / 'd'} "
                                         "empty"):
        pretrain(parse_config(argv + ["--split", "100,0,0"]), Recorder())
    one_document = tmp_path / "one"
    write_synthetic(str(one_document), [4000], vocab=128)  # 98,2,0 of one document: validation gets nothing
    with pytest.raises(ValueError, match="--split 98,2,0 leaves the validation split"):
        pretrain(parse_config(argv[:-6] + ["--data-path", str(one_document), "--vocab-size", "128", "--train-iters",
                                           "2", "--split", "98,2,0"]), Recorder())
    result = pretrain(parse_config(argv + ["--split", "100,0,0", "--eval-iters", "0"]), Recorder())
    assert result.valid_losses == []  # --eval-iters 0: no validation, as in Megatron


def test_eval_iters_0_means_no_validation_on_mock_data():
    result = pretrain(parse_config(TINY + ["--train-iters", "2", "--eval-iters", "0"]), Recorder())
    assert result.valid_losses == [] and len(result.train_losses) == 2


def test_device_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        pretrain(parse_config(TINY[:-2] + ["--device", "cuda", "--train-iters", "1"]))  # TINY ends --device cpu


@pytest.fixture
def small_disk(tmp_path):
    """A 500 KiB tmpfs (room for one tiny checkpoint, not two), when this machine lets the test mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:100]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_during_a_save_loses_nothing(small_disk):
    from megatron_sr.checkpoint.layout import CheckpointWriteError

    root = small_disk / "ckpt"
    run("--train-iters", "2", "--save", str(root))
    before = digest(root)
    with pytest.raises(CheckpointWriteError, match=r"model_optim_rng.pt: cannot write the checkpoint .* MiB are free"):
        run("--train-iters", "4", "--load", str(root), "--save", str(root), "--save-interval", "1")
    assert digest(root) == before and sorted(p.name for p in root.iterdir()) == [
        "iter_0000002", "latest_checkpointed_iteration.txt"]


def test_token_ids_beyond_the_vocabulary_are_one_line(tmp_path):
    from data_helpers import write_synthetic

    write_synthetic(str(tmp_path / "d"), [200] * 20, vocab=1000)
    argv = [a for a in TINY if a != "--mock-data"] + ["--data-path", str(tmp_path / "d"), "--train-iters", "2"]
    with pytest.raises(ValueError, match=r"holds token id \d+, outside the vocabulary of 128"):
        pretrain(parse_config(argv), Recorder())


def test_a_corpus_shorter_than_one_sample_is_an_error(tmp_path):
    from data_helpers import write_synthetic

    write_synthetic(str(tmp_path / "d"), [5, 3], vocab=100)
    argv = [a for a in TINY if a != "--mock-data"] + ["--data-path", str(tmp_path / "d"), "--train-iters", "2"]
    with pytest.raises(ValueError, match="the train split holds 8 tokens, fewer than one sample"):
        pretrain(parse_config(argv), Recorder())


def _sharded_save_with_a_full_disk_on_rank_1(root: str):
    import torch.distributed as dist

    from megatron_sr.checkpoint import layout, sharded
    from megatron_sr.parallel import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    model = torch.nn.Linear(4, 4)
    sharded.save_checkpoint(root, 1, model)  # a good checkpoint first
    if dist.get_rank() == 1:
        def full(obj, path):
            raise OSError(28, "No space left on device")

        layout.torch.save = full
    try:
        sharded.save_checkpoint(root, 2, model, rank_state={"r": dist.get_rank()})
    except OSError as exc:
        return str(exc)
    return "saved"


def test_a_failing_rank_fails_the_sharded_save_on_every_rank_and_keeps_the_last(tmp_path):
    from multiproc import run_ranks

    messages = run_ranks(2, _sharded_save_with_a_full_disk_on_rank_1, str(tmp_path))
    assert "No space left on device" in messages[1] and "another rank could not write" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_ctrl_c_saves_like_sigterm(tmp_path):
    import re
    import signal
    import time

    cmd = [sys.executable, "pretrain_gpt.py", *TINY, "--train-iters", "100000", "--save", str(tmp_path / "ck")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, deadline = [], time.time() + 120
    try:
        while time.time() < deadline:
            lines.append(proc.stdout.readline())
            if re.search(r"iteration\s+2/", lines[-1]):
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    stopped = int((tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text())
    assert proc.returncode == 0 and f"exiting at iteration {stopped} (sigint)" in output, output[-2000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


def test_a_nan_validation_loss_prints_a_nan_perplexity():
    from megatron_sr.training.loop import log_validation

    rec = Recorder()
    log_validation(rec, "validation", 3, float("nan"), None)
    assert "lm loss PPL: nan" in rec.lines[0].lower().replace("ppl", "PPL") and "4.85" not in rec.lines[0]
