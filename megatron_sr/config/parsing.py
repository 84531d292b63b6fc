"""Command line and YAML into a Config: precedence dataclass default < `--config FILE.yaml` < command line.

Megatron-LM's flags that are no field here are parsed too and classified by megatron_flags.py (accepted
with a log note, translated onto a field, or refused by name); argparse abbreviations are off.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from ..megatron_flags import TRANSLATED, classify, megatron_flags
from .checks import finalize
from .sections import _SECTIONS, ALIASES, FLAGS, Config, ConfigError, _coerce, resolve_aliases


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        if message.startswith("unrecognized arguments"):
            message += " (neither a megatron-sr flag nor one of Megatron-LM's GPT pretraining: see --help)"
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: Megatron's --optimizer adam must not be taken for --optimizer-state-dtype
    parser = _Parser(description="Pretrain a GPT with BF16 stochastic-rounding AdamW.", allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file whose keys mirror the flags (the command line wins)")
    for name, (section, f, base) in FLAGS.items():
        help_text = f"{f.metadata['help']} [{section}; default {f.default}]"
        # an alias is its own dest, so resolve_aliases can tell two disagreeing spellings apart
        for dest in (name, *f.metadata.get("aliases", ())):
            flag = "--" + dest.replace("_", "-")
            if dest != name:
                help_text = f"alias of --{name.replace('_', '-')}"
            if base is bool and f.default is True:  # Megatron's spelling of a switch that is on by default
                parser.add_argument("--no-" + flag[2:], dest=dest, action="store_false",
                                    help=help_text.replace("; default True]", "; on unless given]"))
            elif base is bool:
                parser.add_argument(flag, dest=dest, action="store_true", help=help_text)
            elif typing.get_origin(base) is list:
                parser.add_argument(flag, dest=dest, nargs="+", help=help_text)
            else:
                parser.add_argument(flag, dest=dest, type=base, choices=f.metadata["choices"], help=help_text)
    # Megatron's other flags are parsed too, so each one is accepted, translated or refused by name
    # (megatron_flags.py), never "unrecognized"; they stay out of --help
    own = set(parser._option_string_actions)
    for flag in megatron_flags().values():
        if flag.name in own:
            continue
        dest = MEGATRON_DEST + flag.name
        if flag.kind == "switch":
            parser.add_argument(flag.name, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag.name, dest=dest, nargs="*" if flag.kind == "list" else None,
                                help=argparse.SUPPRESS)
    return parser


MEGATRON_DEST = "megatron:"  # argparse dest prefix of the flags megatron_flags.py classifies


def megatron_extras(values: dict, source: str) -> tuple[dict, list[str]]:
    """`values` without the Megatron-only flags, translated ones set on their field, and the log notes of the
    accepted ones; ConfigError (one line naming the flag) for a refused one."""
    out, notes = {}, []
    for key, value in values.items():
        if not key.startswith(MEGATRON_DEST):
            out[key] = value
            continue
        name = key[len(MEGATRON_DEST):]
        if name in TRANSLATED:
            target, setting, why = TRANSLATED[name]
            out[target] = setting
            notes.append(f"{name}: {why}")
            continue
        verdict, line = classify(name, value if isinstance(value, (bool, list)) else [value])
        if verdict == "refused":
            raise ConfigError(line if source == "command line" else f"{source}: {line}")
        notes.append(line)
    return out, notes


def _flatten_quant_block(raw: dict, path: str) -> dict:
    """A `quant:` mapping (point: spec, e.g. `fwd-weight: fp:e4m3:sr`) is the --quant-<point> flags."""
    block = raw.get("quant")
    if block is None:
        return raw
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: 'quant' must be a mapping of quantization points to formats")
    out = {k: v for k, v in raw.items() if k != "quant"}
    for point, spec in block.items():
        out["quant_" + str(point).replace("-", "_")] = spec
    return out


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    out = {}
    for key, value in _flatten_quant_block(raw, path).items():
        name = str(key).replace("-", "_")
        megatron = "--" + str(key).replace("_", "-")
        if name not in FLAGS and name not in ALIASES and megatron in megatron_flags():
            if value is not False and value is not None:  # a Megatron switch set false is not given
                out[MEGATRON_DEST + megatron] = value if isinstance(value, (bool, list)) else str(value)
            continue
        if name not in FLAGS and name not in ALIASES:
            raise ConfigError(f"{path}: unknown key '{key}'")
        out[name] = _coerce(ALIASES.get(name, name), value, path)
    return resolve_aliases(out, path)


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags (and an optional YAML file) into a validated Config; ConfigError on any problem."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    args, notes = megatron_extras(resolve_aliases(args, "command line"), "command line")
    path = args.pop("config", None)
    values, yaml_notes = megatron_extras(load_yaml(path), path) if path else ({}, [])
    values.update(args)  # the command line wins
    return config_from_values(values, yaml_notes + notes)


def _resolve_bf16(values: dict, notes: list[str]) -> None:
    """Megatron's --bf16 is BF16 mixed precision (bf16-mp); --precision, when given, wins."""
    if not values.get("bf16"):
        return
    if "precision" not in values:
        values["precision"] = "bf16-mp"
        notes.append("--bf16: Megatron's BF16 mixed precision (--precision bf16-mp: BF16 weights, FP32 master "
                     "weights, grads and states); add --precision bf16-sr for BF16-only weights with stochastic "
                     "rounding")
    else:
        notes.append(f"--bf16 with --precision {values['precision']}: --precision wins")


def config_from_values(values: dict, notes: list[str] = ()) -> Config:
    sections: dict[str, dict] = {s: {} for s in _SECTIONS}
    values, notes = resolve_aliases(values, "settings"), list(notes)
    _resolve_bf16(values, notes)
    for name, value in values.items():
        if name not in FLAGS:
            raise ConfigError(f"unknown setting '{name}'")
        sections[FLAGS[name][0]][name] = value
    cfg = Config(**{s: cls(**sections[s]) for s, cls in _SECTIONS.items()}, notes=notes)
    finalize(cfg)
    return cfg
