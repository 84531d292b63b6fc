"""tools/quickstart.py end to end on the corpus the project writes itself, then tools/generate.py."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_and_samples(tmp_path):
    proc = subprocess.run([sys.executable, "tools/quickstart.py", "--no-install", "--corpus", "synthetic",
                           "--workdir", str(tmp_path), "--train-iters", "16", "--vocab-size", "300",
                           "--num-layers", "2", "--hidden-size", "64",
                           "--max-new-tokens", "8", "--eval-iters", "2", "--seq-length", "64",
                           "--micro-batch-size", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    losses = [float(x) for x in re.findall(r"\| lm loss: ([\d.E+-]+) \|", out)]
    assert len(losses) == 16 and losses[-1] < losses[0] - 1.0, losses  # the loss visibly falls
    assert re.search(r"final validation loss [\d.]+, perplexity [\d.]+", out)
    assert (tmp_path / "checkpoint" / "iter_0000016" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    sample = re.search(r"\[iteration 16\] Ada(.*)", out)
    assert sample, out[-2000:]

    # The checkpoint samples again from the command line, deterministically for a seed.
    cmd = [sys.executable, "tools/generate.py", "--load", str(tmp_path / "checkpoint"), "--prompt", "Ben",
           "--max-new-tokens", "6", "--seed", "3"]
    runs = [subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout \
        and runs[0].stdout.startswith("[iteration 16] Ben")
    bad = subprocess.run([sys.executable, "tools/generate.py", "--load", str(tmp_path / "nothing")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr

    # The single-file export of that checkpoint (convert_checkpoint.py --export) samples the same text.
    export = tmp_path / "gpt.pt"
    conv = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--load", str(tmp_path / "checkpoint"),
                           "--export", str(export)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0 and export.is_file(), conv.stdout[-2000:] + conv.stderr[-2000:]
    cmd[cmd.index("--load") + 1] = str(export)
    from_export = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert from_export.stdout == runs[0].stdout
    not_export = tmp_path / "other.pt"
    __import__("torch").save({"model": {}}, not_export)
    bad = subprocess.run([sys.executable, "tools/generate.py", "--load", str(not_export)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a model exported by convert_checkpoint.py" in bad.stderr
