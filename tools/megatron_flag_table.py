#!/usr/bin/env python3
"""Write docs/megatron_flags.md: every flag of Megatron-LM's GPT pretraining, its class here and what runs.

    python3 tools/megatron_flag_table.py            # rewrite the table
    python3 tools/megatron_flag_table.py --check    # exit 1 when the committed table is stale (a test runs this)

Classes (megatron_sr/megatron_flags.py): honoured (a megatron-sr setting with Megatron's name and meaning),
accepted (an implementation choice covered another way; the log says what runs), refused (one-line error;
a neutral value such as Megatron's own default is accepted). A honoured flag whose default differs from
Megatron's must say why (megatron_flags.DEFAULT_DIFFERENCES), or this tool fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_sr.cli import run_tool
from megatron_sr.config import ALIASES, FLAGS, MEGATRON_DEST, build_parser
from megatron_sr.megatron_flags import (
    ACCEPTED,
    DEFAULT_DIFFERENCES,
    NEUTRAL,
    TRANSLATED,
    megatron_flags,
    refusal_reason,
)

TOOL = "megatron_flag_table.py"
OUT = Path(__file__).resolve().parents[1] / "docs" / "megatron_flags.md"


def _our_flags() -> dict[str, tuple[str, object]]:
    """option string -> (field name, our default) of every honoured flag."""
    out = {}
    for action in build_parser()._actions:
        if action.dest.startswith(MEGATRON_DEST) or action.dest in ("help", "config"):
            continue
        name = ALIASES.get(action.dest, action.dest)
        for option in action.option_strings:
            out[option] = (name, FLAGS[name][1].default)
    return out


def _same_default(ours: object, theirs: str, switch: bool) -> bool:
    if switch:
        return True  # a switch's default is its absence, here as in Megatron
    try:
        value = json.loads(theirs)
    except ValueError:
        return False
    if isinstance(ours, (int, float)) and isinstance(value, (int, float)) and not isinstance(ours, bool):
        return float(ours) == float(value)
    return ours == value


def rows() -> tuple[list[tuple[str, str, str]], list[str]]:
    """(flag, class, what runs) for every Megatron flag, and the default differences left unexplained."""
    ours = _our_flags()
    table, unexplained = [], []
    for flag in megatron_flags().values():
        if flag.name in ours:
            name, default = ours[flag.name]
            help_text = FLAGS[name][1].metadata["help"]
            what = f"`{name}`: {help_text}"
            if not _same_default(default, flag.default, flag.kind == "switch"):
                why = DEFAULT_DIFFERENCES.get(flag.name)
                if why is None:
                    unexplained.append(f"{flag.name}: ours {default!r}, Megatron's {flag.default}")
                what += f" **Default {default!r} here, {flag.default} in Megatron:** {why}"
            table.append((flag.name, "honoured", what))
        elif flag.name in TRANSLATED:
            target, value, why = TRANSLATED[flag.name]
            table.append((flag.name, "honoured", f"{why} (sets `{target}` to {value!r})"))
        elif flag.name in ACCEPTED:
            table.append((flag.name, "accepted", ACCEPTED[flag.name]))
        else:
            neutral = [v for v in NEUTRAL.get(flag.name, ())]
            if flag.kind != "switch" and flag.default not in ("null", "-", "[]", '""'):
                neutral.insert(0, flag.default)
            what = f"{refusal_reason(flag)} is not supported"
            if neutral:
                what += f"; accepted at {', '.join(dict.fromkeys(neutral))} (changes nothing)"
            table.append((flag.name, "refused", what))
    return table, unexplained


def render(table: list[tuple[str, str, str]]) -> str:
    counts = {c: sum(1 for _, k, _ in table if k == c) for c in ("honoured", "accepted", "refused")}
    lines = ["# Megatron-LM's flags in megatron-sr", "",
             "Every flag of Megatron-LM's GPT pretraining parser (`megatron/training/arguments.py`, read into",
             "`megatron_sr/megatron_flags.tsv` with its commit) and what `pretrain_gpt.py` does with it:",
             "- **honoured**: a megatron-sr setting with Megatron's name, meaning and default (a different default",
             "  says why);",
             "- **accepted**: an implementation choice this code base covers another way; the start-up log says",
             "  once what runs instead;",
             "- **refused**: a one-line error naming the flag (exit 2); a neutral value that changes nothing",
             "  (Megatron's own default) is accepted with a log note.",
             "",
             f"{len(table)} flags: {counts['honoured']} honoured, {counts['accepted']} accepted, "
             f"{counts['refused']} refused. megatron-sr's own flags (`--precision`, `--grad-dtype`, "
             "`--loss-chunk-tokens`, ...) are listed by `python3 pretrain_gpt.py --help`. Written by "
             "`python3 tools/megatron_flag_table.py`.", "",
             "| flag | class | what runs |", "|---|---|---|"]
    for name, kind, what in table:
        lines.append(f"| `{name}` | {kind} | {what.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail when docs/megatron_flags.md is not up to date")
    args = p.parse_args(argv)

    def run() -> int:
        table, unexplained = rows()
        if unexplained:
            raise ValueError("defaults that differ from Megatron's without a reason in "
                             "megatron_flags.DEFAULT_DIFFERENCES: " + "; ".join(unexplained))
        text = render(table)
        if args.check:
            if not OUT.is_file() or OUT.read_text() != text:
                raise ValueError(f"{OUT} is stale: run python3 tools/{TOOL}")
            return 0
        tmp = OUT.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(OUT)
        print(f"wrote {OUT} ({len(table)} flags)")
        return 0

    return run_tool(TOOL, run)


if __name__ == "__main__":
    sys.exit(main())
