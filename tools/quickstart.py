#!/usr/bin/env python3
"""One command from a fresh checkout to a trained small GPT (bf16-sr) and a text sample.

    python3 tools/quickstart.py                      # Tiny Shakespeare if ../shared/data has it, else own corpus
    python3 tools/quickstart.py --input my_texts/    # your text files, directories or JSONL
    python3 tools/quickstart.py --train-iters 1000 --hidden-size 256   # other flags go to pretrain_gpt.py

Steps: install requirements.txt if a package is missing; build a corpus (yours, the shared Tiny
Shakespeare, or a synthetic one the project writes itself: nothing is downloaded); train a
sentencepiece tokenizer and Megatron's .bin/.idx dataset; train a 4-layer GPT with bf16-sr for
300 iterations or --minutes (default 4) on the CPU (or the GPU), whichever comes first, printing the
loss and validation perplexity; save a checkpoint;
sample from it with tools/generate.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NEEDED = ("megatron_sr", "torch", "numpy", "sentencepiece", "yaml", "tqdm")  # the tools import the package


TOOL = "quickstart.py"


class StepFailed(Exception):
    """A step's command exited non-zero; it has printed its own reason already."""


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc != 0:
        step = next((a for a in cmd[1:] if a.endswith(".py")), "pip install" if "pip" in cmd else cmd[0])
        raise StepFailed(f"step {step} failed (exit code {rc}); its reason is printed above")


def install_if_missing() -> None:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"installing requirements.txt (missing: {', '.join(missing)})", flush=True)
        run([sys.executable, "-m", "pip", "install", "-r", str(REPO / "requirements.txt")])


def synthetic_corpus(path: Path, paragraphs: int = 3000, seed: int = 0) -> None:
    """A small English-like corpus from a toy grammar: enough structure for the loss to fall visibly."""
    rng = random.Random(seed)
    names = ["Ada", "Ben", "Cleo", "Dara", "Emil", "Fay", "Gus", "Hana", "Ivo", "June"]
    nouns = ["river", "garden", "lamp", "letter", "market", "song", "window", "ship", "forest", "bridge"]
    verbs = ["found", "painted", "carried", "watched", "opened", "followed", "remembered", "built"]
    adjs = ["old", "quiet", "bright", "small", "green", "distant", "broken", "golden"]
    places = ["by the sea", "in the town", "under the hill", "at dawn", "after the rain", "near the station"]
    paras = []
    for _ in range(paragraphs):
        sents = []
        for _ in range(rng.randint(2, 5)):
            s = (f"{rng.choice(names)} {rng.choice(verbs)} the {rng.choice(adjs)} {rng.choice(nouns)} "
                 f"{rng.choice(places)}")
            if rng.random() < 0.4:
                s += f", and {rng.choice(names)} {rng.choice(verbs)} the {rng.choice(nouns)}"
            sents.append(s + ".")
        paras.append(" ".join(sents))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    # megatron_sr.cli.run_tool's boundary, written out: this tool runs before the package may be installed
    try:
        return quickstart(argv)
    except (StepFailed, OSError, ValueError) as exc:
        print(f"{TOOL}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"{TOOL}: internal error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}", file=sys.stderr)
        raise


def quickstart(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", help="text/JSONL files or directories (default: see above)")
    p.add_argument("--corpus", choices=("auto", "shakespeare", "synthetic"), default="auto",
                   help="without --input: the shared Tiny Shakespeare (auto when present) or the synthetic corpus")
    p.add_argument("--workdir", default=str(REPO / "quickstart"), help="where data and the checkpoint go")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--minutes", type=float, default=4.0, help="stop training after this long (checkpoint kept)")
    p.add_argument("--precision", default="bf16-sr", choices=("bf16-sr", "bf16-mp", "bf16", "fp32"))
    p.add_argument("--no-install", action="store_true", help="do not pip install missing requirements")
    p.add_argument("--prompt", default=None, help="prompt for the sample at the end")
    p.add_argument("--max-new-tokens", type=int, default=60, help="length of the sample at the end")
    args, extra = p.parse_known_args(argv)  # anything else goes to pretrain_gpt.py (e.g. --hidden-size 64)

    if not args.no_install:
        install_if_missing()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.input:
        inputs = [os.path.abspath(i) for i in args.input]  # the steps run in the repository, not here
    elif args.corpus in ("auto", "shakespeare") and SHARED_SHAKESPEARE.is_file():
        inputs = [str(SHARED_SHAKESPEARE)]
    elif args.corpus == "shakespeare":
        raise FileNotFoundError(f"--corpus shakespeare: {SHARED_SHAKESPEARE} not found")
    else:
        corpus = work / "synthetic_corpus.txt"
        synthetic_corpus(corpus)
        inputs = [str(corpus)]
    prompt = args.prompt if args.prompt is not None else ("ROMEO:" if inputs == [str(SHARED_SHAKESPEARE)] else "Ada")

    py = sys.executable
    tok = work / "tokenizer"
    run([py, "tools/train_tokenizer.py", "--input", *inputs, "--vocab-size", str(args.vocab_size),
         "--output-prefix", str(tok), "--text-docs", "paragraph"])
    run([py, "tools/preprocess_data.py", "--input", *inputs, "--output-prefix", str(work / "corpus"),
         "--tokenizer-model", f"{tok}.model", "--append-eod", "--text-docs", "paragraph", "--no-progress"])
    ckpt = work / "checkpoint"
    iters = args.train_iters
    run([py, "pretrain_gpt.py", "--config", "examples/gpt_tiny_quickstart.yaml",
         "--data-path", str(work / "corpus_text_document"), "--tokenizer-model", f"{tok}.model",
         "--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 20)),
         "--log-interval", str(max(1, iters // 12)), "--eval-interval", str(max(1, iters // 3)),
         "--precision", args.precision, "--save", str(ckpt), "--overwrite-checkpoints",  # a demo starts afresh
         "--exit-duration-in-mins", str(args.minutes), *extra])
    run([py, "tools/generate.py", "--load", str(ckpt), "--prompt", prompt,
         "--max-new-tokens", str(args.max_new_tokens)])
    print(f"\ncheckpoint: {ckpt}\nsample again: python3 tools/generate.py --load {ckpt} --prompt \"{prompt}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
