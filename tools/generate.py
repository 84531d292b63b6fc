#!/usr/bin/env python3
"""Sample text from a megatron-sr checkpoint.

    python3 tools/generate.py --load ckpt --prompt "ROMEO:" --max-new-tokens 200   # any tp/pp/dp layout
    python3 tools/generate.py --load gpt.pt --prompt "ROMEO:"   # a file from convert_checkpoint.py --export
The model size and tokenizer come from the checkpoint's saved config (--tokenizer-model overrides).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from megatron_sr.checkpoint.export import read_model
from megatron_sr.cli import first_line, run_tool
from megatron_sr.config import Config
from megatron_sr.model import GPTModel

TOOL = "generate.py"



def load_model(load: str, device: torch.device) -> tuple[GPTModel, Config, int]:
    payload = read_model(load)
    if not isinstance(payload.get("model"), dict) or not payload["model"]:
        raise ValueError(f"{load}: the checkpoint holds no model weights")
    broken = [k for k, v in payload["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{load}: the checkpoint holds non-finite weights ({broken[0]} and {len(broken) - 1} more); "
                         "it cannot generate text")
    cfg = Config.from_dict(payload["config"])
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    model = GPTModel(cfg.model, seed=cfg.training.seed, params_dtype=torch.float32)
    try:
        model.load_state_dict({k: v.float() for k, v in payload["model"].items()})
    except RuntimeError as exc:  # names or shapes that do not fit the model its own config describes
        raise ValueError(f"{load}: the weights do not fit the model of its saved config ({first_line(exc)})") from None
    # BF16 matmuls are slow on most CPUs; FP32 inference of BF16 weights gives the same function.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), cfg, int(payload.get("iteration", 0))


@torch.no_grad()
def generate(model: GPTModel, ids: list[int], max_new_tokens: int, seq_length: int, temperature: float,
             top_k: int, vocab_size: int, eod_id: int | None, generator: torch.Generator) -> list[int]:
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-seq_length:]], device=device)
        logits = model(context)[0, -1, :vocab_size].float()  # drop the vocabulary padding
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, vocab_size)).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))
        if eod_id is not None and nxt == eod_id:
            break
        out.append(nxt)
    return out[len(ids):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--load", required=True,
                        help="checkpoint directory (as given to --save) or an exported .pt/.safetensors model")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--tokenizer-model", help="sentencepiece model (default: the one in the checkpoint's config)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    for flag, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0),
                            ("--temperature", args.temperature,
                             math.isfinite(args.temperature) and args.temperature >= 0),
                            ("--top-k", args.top_k, args.top_k >= 0)):
        if not ok:
            parser.error(f"{flag} must be >= 0 (and finite), got {value}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    def run() -> int:
        model, cfg, iteration = load_model(args.load, device)
        tok_path = args.tokenizer_model or cfg.data.tokenizer_model
        d = cfg.data
        null = d.tokenizer_type == "NullTokenizer"
        if not (tok_path or d.vocab_file or null):
            raise ValueError("the checkpoint was trained without a tokenizer (--mock-data); nothing to decode with")
        from megatron_sr.data.tokenizers import build_tokenizer

        # the checkpoint's tokenizer flags (NullTokenizer's --vocab-size is the model's vocabulary less its eod)
        tok = build_tokenizer(d.tokenizer_type, tok_path, d.vocab_file, d.merge_file,
                              cfg.model.vocab_size - 1 if null else None)
        # ids at or above the model's vocabulary have no embedding row (and padding rows are no tokens)
        if cfg.model.vocab_size is not None and tok.vocab_size > cfg.model.vocab_size:
            flag = "--tokenizer-model " if args.tokenizer_model else ""
            raise ValueError(f"{flag}{tok_path}: vocabulary of {tok.vocab_size} tokens is larger than the model's "
                             f"{cfg.model.vocab_size} ({args.load}); use the tokenizer it was trained with")
        ids = tok.tokenize(args.prompt) if args.prompt else [tok.eod_id]
        gen = torch.Generator().manual_seed(args.seed)
        new = generate(model, ids, args.max_new_tokens, cfg.model.seq_length, args.temperature, args.top_k,
                       tok.vocab_size, tok.eod_id, gen)
        print(f"[iteration {iteration}] {args.prompt}{tok.detokenize(new)}")
        return 0

    return run_tool(TOOL, run)


if __name__ == "__main__":
    sys.exit(main())
