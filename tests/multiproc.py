"""Run a function on N gloo ranks in forkserver processes and collect what each rank returns.

    from multiproc import run_ranks
    results = run_ranks(4, _body, arg1, arg2)   # results[r] is _body(arg1, arg2)'s value on rank r

`fn` must be a module-level function (it is pickled into the children, which import its module).
Each child sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
initialises a gloo process group and calls `fn(*args)`; a child that raises sends its traceback back
and the parent raises it. A child that hangs (a mismatched collective) is killed after `timeout`
seconds. Return values must be picklable; tensors are fine (send small, detached ones).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, results, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share the CI machine's two cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        value = fn(*args)
        # Pickle here, not in the queue's feeder thread, so an unpicklable result is reported, not lost.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_sr.parallel import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def sub_world(world_size: int, tag: str, timeout_s: float = 120.0):
    """Inside a run_ranks body: make ranks [0, world_size) a fresh default process group of that size.

    Yields True on those ranks (with RANK/WORLD_SIZE set to the sub-world's, as torchrun would) and
    False on the others, which skip the block. Lets one set of spawned processes run layouts of
    several world sizes one after another; `tag` must be unique per call (it prefixes the store keys).
    """
    global _BASE_STORE
    rank = int(os.environ["RANK"])
    full_size = int(os.environ["WORLD_SIZE"]) if _BASE_STORE is None else _BASE_STORE[1]
    if _BASE_STORE is None:
        _BASE_STORE = (dist.distributed_c10d._get_default_store(), full_size)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank >= world_size:
        yield False
        return
    saved = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    store = dist.PrefixStore(tag, _BASE_STORE[0])
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        from megatron_sr.parallel import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.update(saved)


_BASE_STORE = None
_CTX = None


def _context():
    """A forkserver that imported torch once: each rank then starts in milliseconds instead of seconds,
    and without inheriting the parent's OpenMP threads (which plain fork would)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "pytest", "megatron_sr.parallel.parallel_state"])
    return _CTX


def run_ranks(world_size: int, fn, *args, timeout: float = 180.0) -> list:
    """fn(*args) on `world_size` gloo ranks; returns the list of per-rank return values."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(rank, world_size, port, results, fn, args), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, object] = {}
    failures: list[str] = []
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"run_ranks: only {len(collected)} of {world_size} ranks finished "
                                   f"within {timeout:.0f} s") from None
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank}:\n{value}")
                break  # the other ranks are probably stuck in a collective now
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("a rank failed\n" + "\n".join(failures))
    return [collected[rank] for rank in range(world_size)]
