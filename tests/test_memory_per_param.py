"""Bytes per parameter held on each dp rank, from the real buffers, vs the precision table's formulas."""

import importlib.util
from pathlib import Path

import pytest
from multiproc import run_ranks

from megatron_sr.parallel import parallel_state as ps

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measure_all():
    ps.initialize_model_parallel(1, 1)
    bench = _bench()
    return {p: bench.measure(p, hidden=64, layers=2, bucket_size=10_000) for p in bench.MODES}


@pytest.mark.slow
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_bytes_per_param_match_design_formula(dp):
    bench = _bench()
    per_rank = run_ranks(dp, _measure_all)
    for precision, (_, formula) in bench.MODES.items():
        for rank_result in per_rank:
            r = rank_result[precision]
            param_bytes = 2.0
            grad_bytes = 2.0 if precision == "bf16-sr" else 4.0
            # padding of each bucket to dp * 8 elements costs a little; nothing else may
            assert param_bytes <= r["params"] < param_bytes * 1.01
            assert grad_bytes <= r["grads"] < grad_bytes * 1.01
            state_bytes = formula(dp) - param_bytes - grad_bytes
            assert abs(r["optimizer_states"] - state_bytes) < 0.02 * state_bytes + 0.01, (precision, dp, r)
            assert abs(r["total"] - formula(dp)) < 0.05, (precision, dp, r)
        # the shards of all ranks together hold exactly one full set of states (8 or 12 bytes/param)
        total_states = sum(rr[precision]["optimizer_states"] for rr in per_rank)
        assert abs(total_states - (8.0 if precision == "bf16-sr" else 12.0)) < 1e-9
