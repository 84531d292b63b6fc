"""On a GPU, iterations between log lines never synchronise with the host (issue 10): loss, grad norm and
the NaN/Inf skip decision stay on the device until a log line reads them. Skips without CUDA."""

import pytest
import torch

from megatron_sr.config import parse_config
from megatron_sr.training.observer import Observer
from megatron_sr.training.pretrain import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LOG_INTERVAL = 8


class SyncIsAnError(Observer):
    """Sync debug mode "error" from after iteration 2 (compilation, plan building) up to the log line."""

    def __init__(self):
        self.checked = 0

    def log(self, message: str) -> None:
        pass

    def on_step(self, iteration, loss, result) -> None:
        if iteration == 2:
            torch.cuda.set_sync_debug_mode("error")
        elif iteration == LOG_INTERVAL:  # the log line's transfer comes right after this call
            torch.cuda.set_sync_debug_mode("default")
            self.checked = LOG_INTERVAL - 2


@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-mp"])
def test_iterations_between_log_lines_do_not_synchronise(precision, compile_mode):
    argv = ("--mock-data --vocab-size 512 --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 128 "
            f"--micro-batch-size 4 --global-batch-size 8 --train-iters {LOG_INTERVAL} --log-interval {LOG_INTERVAL} "
            "--eval-interval 0 --eval-iters 1 --device cuda --clip-grad 1.0").split()
    observer = SyncIsAnError()
    try:
        result = pretrain(parse_config(argv + ["--precision", precision, "--torch-compile", compile_mode]), observer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert observer.checked == LOG_INTERVAL - 2 and result.state.iteration == LOG_INTERVAL
    assert result.train_losses[-1] < result.train_losses[0]
