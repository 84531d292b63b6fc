"""TensorBoard event files read record by record, independently of the tools' own readers (test helper)."""

from __future__ import annotations

from pathlib import Path


def scalars_of(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in tb_dir's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    got: dict[str, dict[int, float]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else \
                    float(tensor_util.make_ndarray(value.tensor))
                got.setdefault(value.tag, {})[event.step] = number
    return got
