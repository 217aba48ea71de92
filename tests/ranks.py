"""Run a function on N CPU processes joined by Gloo, as torchrun would start them (tests only).

    results = run_on_ranks(fn, 2, arg)   # fn(runtime, arg) on ranks 0 and 1; returns [result0, result1]

Each process gets the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and builds its `Runtime` with `setup_runtime`, the same call the scripts make. `fn`
must be a module-level function (it is pickled into the child processes).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(world_size: int, port: int | None = None) -> dict:
    """The environment of a `torchrun --standalone --nproc_per_node=N` job, minus the per-rank part."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1"}


def _child(rank, world_size, port, fn, args, queue):
    os.environ.update(torchrun_env(world_size, port))
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    sys.path.insert(0, ROOT)
    try:
        import torch

        torch.set_num_threads(1)
        from minirlhf.runtime import setup_runtime

        runtime = setup_runtime("cpu", "fp32", seed=0)
        queue.put((rank, "ok", fn(runtime, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))


def run_on_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """`fn(runtime, *args)` on `world_size` Gloo processes; their return values in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_child, args=(rank, world_size, port, fn, args, queue))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300.0):
    """Run `torchrun --standalone --nproc_per_node=nproc script args...` (as `python -m
    torch.distributed.run`, so no PATH lookup) from the repository root, one torch thread per
    process; returns the CompletedProcess (text mode, output captured)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
