"""Helpers shared by several test modules (tests only; fixtures live in tests/conftest.py).

    run_in_process(train_dpo, argv, monkeypatch, capsys)   # `python train_dpo.py ARGV`: (code, stdout, stderr)
    assert_one_error_line(code, stderr, "rm.pt")            # bad input: one "error: ..." line, no traceback
    assert_smoke_run_wrote(result, "train_dpo.py", out, ["dpo.pt"])
    load_script("prepare_under_test", "data/prepare.py")   # a script that is not a package module
    data_dir, out_dir, tokenizer = toy_world(tmp_path_factory, "dpo_world", text)
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys

from minirlhf.cli import run_main
from minirlhf.tokenizer import Tokenizer, save_ranks, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_process(module, argv, monkeypatch, capsys, stdin: str | None = None) -> tuple[int, str, str]:
    """What `python MODULE.py ARGV` does, in this process, through run_main: (exit code, stdout, stderr).
    `module` is the imported script or its name ("train_sft"); `stdin`, if given, is what the user types."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        run_main(module.main)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, stderr, *must_contain):
    """Bad input was refused the way every script must: a non-zero exit, no traceback, and exactly one
    line on stderr, an "error: ..." line that contains each of `must_contain`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code not in (0, None), "bad input should give a non-zero exit"
    assert "Traceback" not in stderr, f"a traceback for bad input:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error:") or ": error:" in lines[0], lines[0]
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in the error line {lines[0]!r}"


def assert_smoke_run_wrote(result, script: str, out_dir, names) -> None:
    """The subprocess `result` of `python SCRIPT --preset smoke ...` exited 0 (else: the ends of its
    output) and wrote each file of `names` in `out_dir`, none of them empty."""
    assert result.returncode == 0, f"{script} --preset smoke failed:\n{result.stdout[-2000:]}\n{result.stderr}"
    for name in names:
        path = os.path.join(out_dir, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{name} was not written"


def load_script(name: str, relative_path: str):
    """Load the script at ROOT/RELATIVE_PATH (not a package module: experiments/, benchmarks/, data/)
    as the module `name`, registered in sys.modules, where dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def toy_world(tmp_path_factory, name: str, text: str):
    """A new temporary folder NAME with data/ holding a 300-token BPE tokenizer trained on `text`;
    out/ is only named (the first checkpoint saved there creates it): (data_dir, out_dir, tokenizer)."""
    root = tmp_path_factory.mktemp(name)
    data_dir, out_dir = root / "data", root / "out"
    data_dir.mkdir()
    save_ranks(train_bpe(text, 300), data_dir / "tokenizer.tiktoken")
    return data_dir, out_dir, Tokenizer.from_file(data_dir / "tokenizer.tiktoken")
