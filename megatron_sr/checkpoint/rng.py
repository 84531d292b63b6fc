"""Every random stream a resume must continue: Python, NumPy, torch CPU and CUDA, and the tracked tp RNG."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..parallel.random import get_rng_tracker


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])
