"""Where a script computes: the device, the precision, and the processes of a torchrun job.

Every stage script builds one `Runtime` at its start and asks it for everything that depends on
where the tensors live:

    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    model = runtime.prepare(GPT(config))              # on the device, bf16 autocast if asked
    sampler = runtime.generator(cfg.seed)             # sampling dice on the model's device
    train_model = runtime.wrap(model)                 # DistributedDataParallel under torchrun

This is the only file of the project that makes a `torch.Generator` or moves a model to a device,
so a script cannot sample on CUDA with dice made on the CPU (the first GPU run crashed exactly so:
"Expected a 'cuda' device type for generator but found 'cpu'"). `tests/test_runtime.py` checks
that no other file does.

Precision (`--dtype`):
    fp32   everything in fp32 (the CPU default; TF32 off on the CPU, allowed for fp32 matmuls on CUDA)
    bf16   the transformer's matmuls and attention run under bf16 autocast; weights, gradients and
           optimizer state stay fp32. The trunk's output (after the final LayerNorm) is returned as
           fp32, so what RLHF needs exact is computed in fp32: the LM head inside the logprob kernel
           (which also switches autocast off), logprobs, ratios, KL, rewards, values, GAE and
           whitening. A bf16 logit is only good to ~3 significant digits - 0.03 nats on a logit of
           10 - which is the size of a whole PPO step's change in log-probability.
    auto   bf16 on a GPU that supports it, fp32 otherwise.

Several processes (`torchrun --standalone --nproc_per_node=N train_x.py ...`): torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK; `setup_runtime` then joins the process group (NCCL on GPUs, Gloo on the
CPU), gives each rank its own GPU, and silences stdout on every rank but 0 (errors still reach
stderr). Rank 0 alone writes files. The reductions below (`all_reduce_sum`, `mean_over_ranks`,
`gather_objects`) are the identity in a single process, so `python train_x.py` is unchanged.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minirlhf.cli import UserError
from minirlhf.kernels import set_kernel_impl

DTYPES = ("auto", "fp32", "bf16")
RANK_SEED_STRIDE = 1_000_003   # rank r samples with seed + r * stride: independent dice per rank


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cpu`; `cuda` or `cuda:N` (a `UserError` when CUDA is
    not available, rather than a crash at the first `.to(device)`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            reason = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"--device {name} was requested but CUDA is not available ({reason}); "
                            "use --device cpu or --device auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a valid device (expected auto, cpu, cuda or cuda:N)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    raise UserError(f"--device {name!r} is not a valid device (expected auto, cpu or cuda)")


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Same seed, same machine -> same numbers. (Across machines, or CPU vs GPU, float results may
    differ in the last bits: different kernels sum in different orders.)
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed must fit in 32 bits
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Runtime:
    """The device, precision and process layout of one script run (see the module docstring)."""

    device: torch.device
    dtype: str = "fp32"          # "fp32" or "bf16" (resolved: never "auto")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, plots and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype == "bf16" else None

    # ---- device-bound objects -------------------------------------------------------------------

    def generator(self, seed: int, *, shared: bool = False) -> torch.Generator:
        """Sampling dice on this run's device. Each rank gets its own stream (seed + rank * stride)
        unless `shared`: then every rank draws the same numbers (e.g. the same data order)."""
        offset = 0 if shared else self.rank * RANK_SEED_STRIDE
        return torch.Generator(device=self.device).manual_seed(seed + offset)

    def cpu_generator(self, seed: int, *, shared: bool = True) -> torch.Generator:
        """Dice for CPU-side choices (data order, minibatch splits, random windows of a CPU
        tensor). Shared by every rank by default: ranks agree on the global batch, then each takes
        its own slice of it (`shard`)."""
        offset = 0 if shared else self.rank * RANK_SEED_STRIDE
        return torch.Generator().manual_seed(seed + offset)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move `model` to the device and set the precision its transformer runs in."""
        from minirlhf.model import GPT   # (model.py does not import this module)

        model.to(self.device)
        for module in model.modules():
            if isinstance(module, GPT):
                module.autocast_dtype = self.autocast_dtype
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call for TRAINING forward passes: `DistributedDataParallel(model)` under
        torchrun (its backward averages the gradients over the ranks), `model` itself otherwise.
        Sampling and evaluation call `model` directly: they need no gradient synchronisation."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    # ---- splitting work and reducing results across ranks -------------------------------------

    def shard(self, items: list) -> list:
        """This rank's share of `items`: every world_size-th one, starting at its rank. The shares
        of all ranks partition `items`; with one process it is `items`."""
        return items[self.rank::self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (a new tensor; the input is not changed)."""
        total = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_over_ranks(self, *values: float) -> list[float]:
        """Each float summed over the ranks (one all-reduce for all of them)."""
        summed = self.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self._reduce_device))
        return summed.tolist()

    def mean_over_ranks(self, record: dict) -> dict:
        """Each float of `record` averaged over the ranks (for logged metrics each rank computed on
        an equal share; token-weighted means are built from `sum_over_ranks` instead)."""
        if not self.distributed:
            return dict(record)
        names = [name for name, value in record.items() if isinstance(value, (int, float))]
        totals = self.sum_over_ranks(*(float(record[name]) for name in names))
        return {**record, **{name: total / self.world_size for name, total in zip(names, totals)}}

    def gather_objects(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank (picklable objects)."""
        if not self.distributed:
            return list(items)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _reduce_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; Gloo, CPU tensors
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` -> bf16 on a GPU that supports it, fp32 otherwise; `fp32`; `bf16` (a `UserError` on a
    GPU without bf16; on the CPU bf16 autocast works, slowly: useful for tests)."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not a valid precision (expected one of {', '.join(DTYPES)})")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bf16: this GPU does not support bfloat16; use --dtype fp32")
    return name


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 0, *, kernels: str = "auto") -> Runtime:
    """Seed everything, choose the kernels, the device and the precision, and join the torchrun
    process group when there is one. Call once, at the start of a script's `main()`."""
    seed_everything(seed)   # the same on every rank: identical initial weights everywhere
    set_kernel_impl(kernels)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    resolved = resolve_device(device)
    if world_size > 1 and resolved.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {world_size} processes but only {torch.cuda.device_count()} "
                            "GPU(s) are visible: lower --nproc_per_node")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if resolved.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls may use TF32 on GPUs
        torch.backends.cudnn.allow_tf32 = True
    runtime = Runtime(device=resolved, dtype=resolve_dtype(dtype, resolved), rank=rank, world_size=world_size)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        # (`cli.run_main` closes the group once every rank's main() has returned)
        if rank != 0:
            sys.stdout = open(os.devnull, "w")   # rank 0 alone prints
    return runtime
