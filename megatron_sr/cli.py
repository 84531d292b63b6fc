"""The one error boundary of every command-line entry point (pretrain_gpt.py and tools/*.py).

Expected failures (bad input, a missing or corrupt file, a full disk: OSError and ValueError, whose
messages name the file or flag) are one line `<tool>: error: <message>` and exit 2; Ctrl-C is one line
and exit 130; anything else is a bug: a one-line summary for the log, then its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def run_tool(tool: str, body: Callable[[], T], *, expected: tuple[type[BaseException], ...] = (OSError, ValueError),
             interrupted: str = "interrupted", on_failure: Callable[[], None] | None = None) -> T | int:
    """body()'s result, or the exit code of its expected failure (2) or of Ctrl-C (130), each told in one
    line; `on_failure` cleans up after either (a partial output, say)."""
    try:
        return body()
    except expected as exc:
        if on_failure is not None:
            on_failure()
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if on_failure is not None:
            on_failure()
        print(f"{tool}: {interrupted}", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"{tool}: internal error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        raise
