"""Checkpoints: one self-describing `.pt` file per stage, written atomically, read as data only.

A checkpoint is a single dict of tensors and plain Python values:

    {
        "format_version": 1,
        "kind": "sft",                         # base | sft | rm | ppo: which stage wrote it
        "model": {name: tensor},               # the model's state dict, on the CPU
        "model_config": {...},                 # enough to rebuild the model (GPTConfig as a dict)
        "tokenizer": {"name", "sha256", ...},  # which tokenizer the token ids refer to
        "train_config": {...},                 # the stage's resolved config, for the record
        "step": 1200,
        "metrics": {"loss/sft": 1.93, ...},    # final summary, plain floats
        ...                                    # what the kind needs: the RM's normalisation,
    }                                          # PPO's value model, optimizer state, KL coefficient

An interval save of train_base, train_sft or train_rm (every --save-every steps, for `--resume`)
holds `"finished": False` and the optimizer; `load_checkpoint` refuses it unless asked
(`unfinished_ok`), so the next stage never starts from a half-trained model by accident.

Two properties matter more than the layout:

1. **Atomic writes.** `save_checkpoint` writes to a temporary file in the same directory, fsyncs
   it, and renames it over the target with `os.replace`, which is atomic on POSIX and Windows.
   A crash or Ctrl-C mid-save leaves the previous checkpoint as it was: the reader sees the old
   file or the new one, never half of one.
2. **Data, never code.** `load_checkpoint` uses `torch.load(..., weights_only=True)`, which only
   rebuilds tensors and plain containers; a plain `torch.load` unpickles arbitrary objects, and
   unpickling can run code. So `save_checkpoint` refuses anything that would not load that way
   (a NumPy array, a custom class) when saving, not months later when loading.

Loading the wrong file is a one-line `UserError` that names the file: a missing file, a truncated
or foreign file, a checkpoint of another kind ("out/rm.pt is a 'rm' checkpoint, expected 'sft'"),
or one made with another tokenizer. Not a shape-mismatch traceback forty lines deep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
import secrets
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minirlhf.cli import UserError, config_to_dict

__all__ = [
    "CHECKPOINT_KINDS",
    "FORMAT_VERSION",
    "REQUIRED_FIELDS",
    "save_checkpoint",
    "load_checkpoint",
    "load_resume_checkpoint",
    "atomic_write",
]

CHECKPOINT_KINDS = ("base", "sft", "rm", "ppo", "dpo", "grpo", "rloo", "expert")
FORMAT_VERSION = 1
REQUIRED_FIELDS = ("format_version", "kind", "model", "model_config", "tokenizer", "train_config", "step", "metrics")

# which script writes each kind: named in the "not found" message so a student knows what to run
_WRITTEN_BY = {"base": "train_base.py", "sft": "train_sft.py", "rm": "train_rm.py", "ppo": "train_ppo.py",
               "dpo": "train_dpo.py", "grpo": "train_grpo.py", "rloo": "train_grpo.py --advantage rloo",
               "expert": "train_expert.py"}

# what torch.load(weights_only=True) rebuilds; anything else is converted or refused at save time
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    model_state: dict[str, torch.Tensor],
    model_config,
    tokenizer_identity,
    train_config,
    step: int,
    metrics: dict[str, Any],
    **extra,
) -> None:
    """Write one checkpoint file atomically (temporary file in the same directory, fsync, rename).

    Args:
        path: the target file (e.g. `out/sft.pt`); its directory is created if needed.
        kind: one of `CHECKPOINT_KINDS`.
        model_state: `model.state_dict()`; tensors are detached and moved to the CPU, so a GPU
            checkpoint loads on a CPU-only machine.
        model_config, tokenizer_identity, train_config: dataclasses or dicts (stored as dicts).
        step: the training step the checkpoint was taken at.
        metrics: a final summary, {name: number}; numbers (0-d tensors included) are stored as floats.
        **extra: what the kind needs: tensors, plain values, nested state dicts (an optimizer's
            `state_dict()`, a value model's). Their names must not clash with the fields above.

    Raises:
        ValueError: unknown kind, or an extra field named like a required one.
        TypeError: a value that `torch.load(weights_only=True)` could not read back, with its key path.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
    clashes = set(extra) & set(REQUIRED_FIELDS)
    if clashes:
        raise ValueError(f"extra checkpoint fields {sorted(clashes)} clash with the required fields")

    # Trap: a GPT with a tied LM head has the same tensor under two names (the token embedding and
    # lm_head.weight). torch.save stores a shared storage once, but calling `.cpu()` on each CUDA
    # entry separately would make two copies. `memo` maps each device tensor to one CPU copy.
    memo: dict[tuple, torch.Tensor] = {}
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": _to_plain(dict(model_state), "model", memo),
        "model_config": _to_plain(_as_dict(model_config), "model_config", memo),
        "tokenizer": _to_plain(_as_dict(tokenizer_identity), "tokenizer", memo),
        "train_config": _to_plain(_as_dict(train_config), "train_config", memo),
        "step": int(step),
        "metrics": {str(name): _to_float(value, f"metrics[{name!r}]") for name, value in metrics.items()},
    }
    for name, value in extra.items():
        checkpoint[name] = _to_plain(value, name, memo)
    with atomic_write(path, "wb") as f:
        torch.save(checkpoint, f)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str | tuple[str, ...] | None = None,
    tokenizer_identity=None,
    map_location="cpu",
    unfinished_ok: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, as data only (`weights_only=True`).

    Args:
        path: the checkpoint file.
        kind: the kind(s) the caller accepts (`"sft"` or `("sft", "ppo")`); None accepts any kind.
        tokenizer_identity: the current tokenizer's identity (a dict or dataclass with `sha256`);
            when given, a checkpoint made with another tokenizer is refused: its token ids would
            mean different strings, and the model would silently produce garbage.
        map_location: passed to `torch.load` (default: everything on the CPU).
        unfinished_ok: accept an interval save of a run that was interrupted (`finished: False`;
            train_base, train_sft and train_rm write one every --save-every steps). Only `--resume`
            wants one: the next stage would silently start from a half-trained model.

    Returns:
        the checkpoint dict (see the module docstring for its fields).

    Raises:
        UserError: one line naming the file, for each way the file can be wrong.
    """
    path = Path(path)
    accepted = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if not path.exists():
        hint = ""
        if accepted and accepted[0] in _WRITTEN_BY:  # the first accepted kind is the usual input
            hint = (f"; run {_WRITTEN_BY[accepted[0]]} first, or give the path of an existing "
                    f"{_quoted(accepted)} checkpoint")
        raise UserError(f"checkpoint {path} not found{hint}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a checkpoint file")
    _verify_archive(path)
    try:
        with warnings.catch_warnings():
            # a plain pickle file triggers a "Detected pickle protocol" warning before failing; the
            # UserError below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise UserError(f"{path} contains pickled Python objects ({refused.group(1)}), not only tensors and "
                            "plain values; minirlhf loads checkpoints with weights_only=True and will not run "
                            "code from a file") from None
        raise UserError(f"{path} is not a readable torch checkpoint (corrupt, or not a torch file)") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, AttributeError) as error:
        # the archive is whole (checked above), so the problem is inside it: a zip that is not a torch
        # file, a torch file from an incompatible version, a map_location device that does not exist
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable torch checkpoint: {detail}") from None

    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a minirlhf checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    missing = [name for name in REQUIRED_FIELDS if name not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a minirlhf checkpoint (missing fields: {', '.join(missing)})")
    if not isinstance(checkpoint["format_version"], int) or checkpoint["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {checkpoint['format_version']!r}; this minirlhf reads "
                        f"format {FORMAT_VERSION} and older (update minirlhf)")

    if accepted and checkpoint["kind"] not in accepted:
        raise UserError(f"{path} is a '{checkpoint['kind']}' checkpoint, expected {_quoted(accepted)}")
    if checkpoint.get("finished") is False and not unfinished_ok:
        script = _WRITTEN_BY.get(checkpoint["kind"], "the stage")
        raise UserError(f"{path} is an unfinished run, saved at step {checkpoint['step']}: finish it with "
                        f"`python {script} --resume` (the same flags), or run {script} again")

    if tokenizer_identity is not None:
        current = _as_dict(tokenizer_identity)
        saved = checkpoint["tokenizer"]
        if not _same_tokenizer(saved, current):
            raise UserError(f"{path} was made with another tokenizer ({_describe_tokenizer(saved)}; current: "
                            f"{_describe_tokenizer(current)}); re-run the stages from train_base.py with the "
                            "current tokenizer, or restore the tokenizer files it was made with")
    return checkpoint


def load_resume_checkpoint(path: str | os.PathLike, *, kind: str, tokenizer_identity, total_steps: int | None,
                           model_config, train_config, needs: tuple[str, ...] = ("optimizer",)) -> dict[str, Any]:
    """The checkpoint a `--resume`d run continues from, checked before any weight is touched.

    It must be an unfinished run of this stage (`step` < `total_steps` when that is known yet, holding
    the `needs` fields that only an interval save writes) with this run's model shape. The run is rebuilt from the
    flags given now (the learning-rate schedule, the batches, the data order), so a flag that
    differs from the interrupted run's is named in a note: the result would not be that run's.
    """
    checkpoint = load_checkpoint(path, kind=kind, tokenizer_identity=tokenizer_identity, unfinished_ok=True)
    if total_steps is not None and checkpoint["step"] >= total_steps:
        raise UserError(f"{path} is already at step {checkpoint['step']} of {total_steps}: that run finished, "
                        "there is nothing to resume")
    missing = [name for name in needs if name not in checkpoint]
    if missing:
        raise UserError(f"{path} holds no {', '.join(missing)} (it is not an interval save of an interrupted run): "
                        "cannot resume from it")
    if checkpoint["model_config"] != _as_dict(model_config):
        raise UserError(f"{path} holds a model of another shape than this run's; resume with the flags of the run "
                        "that wrote it")
    current = _as_dict(train_config)
    for name, value in checkpoint["train_config"].items():
        if name not in ("resume", "debug") and name in current and current[name] != value:
            print(f"note: --{name.replace('_', '-')} is {current[name]!r}, the interrupted run had {value!r}")
    return checkpoint


# --------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a file for writing so that readers see the old file or the new one, never a partial one.

        with atomic_write("out/comparisons.jsonl", "w") as f:
            f.write(...)

    Writes go to a temporary file in the same directory (os.replace is only atomic within one
    filesystem), with a hidden, unique name (two runs saving at once never share one). On success
    the file is fsynced (its bytes are on disk before the rename makes them visible) and renamed
    over `path`; on any error, Ctrl-C included, it is deleted and `path` is untouched. The
    directory is created if needed. `mode` is "wb" or "w" (text, UTF-8).

    The temporary file is created with open(), so it gets the usual permissions; tempfile.mkstemp
    would make the final file readable by its owner only.

    A process killed outright (`kill -9`, a power cut) cannot delete its temporary file: the next
    write of the same `path` removes the ones whose process is gone (the pid is in the name).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    text = "b" not in mode
    try:
        with open(tmp_path, mode.replace("w", "x"), encoding="utf-8" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:  # KeyboardInterrupt too: never leave a temporary file behind
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.NAME.<pid>.<hex>.tmp` files of `path` left by processes that no longer run (a
    live one may be writing it right now: two runs saving into one directory)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp")
    for candidate in path.parent.iterdir():
        found = pattern.fullmatch(candidate.name)
        if found and not _process_is_alive(int(found.group(1))):
            candidate.unlink(missing_ok=True)


def _process_is_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":   # (on Windows, os.kill(pid, 0) would send Ctrl-C)
        return True
    try:
        os.kill(pid, 0)   # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True       # it exists (another user's), or we cannot tell: leave its file alone
    return True


def _verify_archive(path: Path) -> None:
    """Check the file is a whole zip archive whose members match their CRC-32 checksums.

    A torch file is a zip archive, and torch.save writes a CRC-32 for every member, but torch.load
    does not check them: a damaged byte inside a tensor loads silently as a wrong weight. zipfile's
    testzip reads every member and compares its checksum (one extra read of the file, at disk speed).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        detail = str(error).strip() or type(error).__name__
        raise UserError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {detail}") from None
    if damaged_member is not None:
        raise UserError(f"{path} is corrupt: {damaged_member} does not match its checksum (a damaged copy?)")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _as_dict(value) -> dict:
    if value is None:
        return {}
    if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(value, dict):
        return config_to_dict(value)
    raise TypeError(f"expected a dataclass instance or a dict, got {type(value).__name__}")


def _to_float(value, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{where}: expected a number, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{where}: expected a number, got {type(value).__name__}")


def _to_plain(value, where: str, memo: dict):
    """Tensors to detached CPU tensors, NumPy to torch/Python, dataclasses to dicts; refuse the rest.

    `where` is the key path ("optimizer['state'][3]") so a refusal says exactly what to fix.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.device.type == "cpu":
            return value
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
               tuple(value.shape), value.stride(), value.dtype)
        if key not in memo:
            memo[key] = value.cpu()
        return memo[key]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())  # weights_only cannot read NumPy arrays
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = config_to_dict(value)
    if isinstance(value, dict):
        return {key: _to_plain(item, f"{where}[{key!r}]", memo) for key, item in value.items()}
    if type(value) in (list, tuple):  # exact types: a namedtuple would not load with weights_only
        return type(value)(_to_plain(item, f"{where}[{i}]", memo) for i, item in enumerate(value))
    if isinstance(value, _PLAIN_SCALARS):
        return value
    raise TypeError(f"checkpoint field {where}: {type(value).__name__} cannot be saved "
                    "(checkpoints hold tensors and plain Python values only)")


def _quoted(kinds: tuple[str, ...]) -> str:
    return " or ".join(f"'{k}'" for k in kinds)  # ("sft", "ppo") -> 'sft' or 'ppo'


def _same_tokenizer(saved: dict, current: dict) -> bool:
    if "sha256" in saved and "sha256" in current:
        return saved["sha256"] == current["sha256"]
    return saved == current


def _describe_tokenizer(identity: dict) -> str:
    name = identity.get("name", "?")
    digest = identity.get("sha256")
    return f"{name} sha256 {digest[:12]}" if isinstance(digest, str) else f"{name}"


POLICY_KINDS = ("base", "sft", "ppo", "dpo", "grpo", "rloo", "expert")   # checkpoints whose "model" is a GPT language model


def load_policy(path, tokenizer_identity: dict | None = None, runtime=None, kinds=POLICY_KINDS):
    """The one loader for a policy: a base, SFT or PPO checkpoint -> (GPT in eval mode, checkpoint dict).

    `runtime` (a `minirlhf.runtime.Runtime`) puts it on its device and precision; None: CPU, fp32.
    eval(): dropout off, as in every RL forward pass. Wrong kind (e.g. rm.pt) or another tokenizer:
    a UserError naming the file.
    """
    from minirlhf.model import GPT, GPTConfig   # here, not at the top: model.py needs nothing from this file

    ckpt = load_checkpoint(path, kind=kinds, tokenizer_identity=tokenizer_identity)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if runtime is not None:
        runtime.prepare(model)
    return model.eval(), ckpt
