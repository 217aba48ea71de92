"""What the benchmark scripts share: timing a call, its peak memory, and running a child process.

Imported by the scripts as ``benchmarks.common`` (each puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU (nothing on the CPU): time what it did, not what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(call, device: torch.device, repeats: int) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``call()``, synchronised on CUDA (warm up first)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_of(call, device: torch.device, fresh_process: bool) -> dict:
    """Peak memory (bytes) that one ``call()`` adds to what was allocated before it, and how.

    ``call`` has already run once (warm-up). CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
    peak resident size, which needs a fresh process started by `run_child_process` with
    ``measures_memory=True``; otherwise no figure is given (``peak_bytes`` None).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before,
                "memory_method": "torch.cuda.max_memory_allocated"}
    if fresh_process and reset_peak_rss():
        before = proc_status_bytes("VmRSS")
        call()
        return {"peak_bytes": proc_status_bytes("VmHWM") - before,
                "memory_method": "VmHWM after clear_refs (MALLOC_MMAP_THRESHOLD_=65536)"}
    return {"peak_bytes": None, "memory_method": "none (CPU without a fresh process)"}


def run_child_process(command: list[str], measures_memory: bool) -> tuple[object, str | None]:
    """Run a benchmark's child process: ``(its last line of output as JSON, None)``, or
    ``(None, its last line of errors)`` if it failed.

    ``measures_memory``: the child measures CPU memory, so glibc is told to give every allocation
    >= 64 KiB its own mapping, returned to the OS on free: the resident size then tracks live
    tensors (timing runs keep malloc's defaults).
    """
    env = dict(os.environ)
    if measures_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        return None, (completed.stderr.strip().splitlines() or [f"exit code {completed.returncode}"])[-1]
    return json.loads(completed.stdout.strip().splitlines()[-1]), None
