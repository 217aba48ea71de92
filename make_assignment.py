"""Turn the repository into homework: write a student copy with the solutions taken out.

    python make_assignment.py                        # student/ with every solution region blanked
    python make_assignment.py --out /tmp/hw --only masked_mean sft_loss gae_reference
    python make_assignment.py --list-regions         # what can be blanked, and the tests that grade it

In the library, the body of each function a student should write sits between two comment lines:

    def masked_mean(x, mask, dim=None):
        '''The docstring: formula, shapes, conventions, paper. Students keep it.'''
        # BEGIN SOLUTION
        # HINT: select with torch.where; multiplying by the mask turns a padded inf into nan
        ... the solution ...
        # END SOLUTION

In the student copy the markers, the docstring and any `# HINT:` line stay, and the rest of the
region becomes one line that raises NotImplementedError("implement masked_mean: <hint>") (the
hint is the HINT line, or else the first line of the docstring). Everything else is copied as it
is, so the package still imports and every test of the other functions still runs: `pytest` fails
on exactly the tests of the blanked functions - and of the functions that call them: `--list-regions`
names those too (implement masked_mean first: most losses use it). An instructor grades a
submission by copying the student's files over a solution-free copy and running the commands
`--list-regions` prints, e.g. `pytest tests/test_losses.py -k sft_loss`.

What is copied: `git ls-files --cached --others --exclude-standard` (tracked files, and new files
.gitignore does not exclude: never out/, generated data or caches), or outside a git checkout
every file except those folders. tests/test_assignment.py, which tests this tool against the
solutions, is left out.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from minirlhf.cli import UserError, option, parse_config, run_main

ROOT = os.path.dirname(os.path.abspath(__file__))
BEGIN, END, HINT = "# BEGIN SOLUTION", "# END SOLUTION", "# HINT:"
STUB_ERROR = "NotImplementedError"  # what a blanked function raises
LEFT_OUT = {"tests/test_assignment.py"}  # instructor-only: it needs the solutions
SKIPPED_DIRS = {".git", "out", "student", "__pycache__", ".pytest_cache", ".venv", ".benchmarks"}
SKIPPED_DATA = {"corpus.txt", "tokenizer.tiktoken", "manifest.json"}  # data/prepare.py writes them
MARKER_FILE = ".minirlhf-student-copy"  # lets --force delete a previous student copy, and nothing else


@dataclass
class AssignmentConfig:
    out: str = option("student", "folder to write the student copy to")
    only: list[str] = option([], "blank only these functions (a name, Class.method, or a class for all its methods; "
                                 "default: every solution region)")
    list_regions: bool = option(False, "list the solution regions and the tests that grade each, then exit")
    force: bool = option(False, "replace a previous student copy at --out")


@dataclass
class Region:
    """One solution region: lines `begin`..`end` (0-based, the marker lines) of `path`."""

    path: str             # relative to the repository root, with "/"
    function: str         # qualified name: "masked_mean", "AdaptiveKLController.update"
    begin: int
    end: int
    indent: str           # the BEGIN line's indentation, used for the replacement line
    hint: str             # what the student is told
    body: str             # the solution's text (to find which other regions call this one)

    @property
    def test_key(self) -> str:
        """The name the tests are named after: the function, or for a method its class in snake_case
        (tests/test_losses.py names its tests test_<function>_..., test_adaptive_kl_controller_...)."""
        if "." not in self.function:
            return self.function
        return snake_case(self.function.split(".")[0])


def snake_case(name: str) -> str:
    """AdaptiveKLController -> adaptive_kl_controller."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def find_regions(source: str, path: str) -> list[Region]:
    """Every BEGIN/END SOLUTION region of one file, with the function that holds it.

    Raises UserError (naming file and line) for a BEGIN without an END, nested or stray markers,
    and a region outside any function (it would have no name to put in the error).
    """
    lines = source.splitlines()
    functions = []  # (first line, last line, qualified name, docstring), 1-based as ast gives them

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    functions.append((child.lineno, child.end_lineno, name, ast.get_docstring(child) or ""))
                visit(child, name + ".")

    visit(ast.parse(source, filename=path), "")
    regions, begin = [], None
    for index, line in enumerate(lines):
        marker = line.strip()
        if marker == BEGIN:
            if begin is not None:
                raise UserError(f"{path}:{index + 1}: '{BEGIN}' inside the region opened at line {begin + 1}")
            begin = index
        elif marker == END:
            if begin is None:
                raise UserError(f"{path}:{index + 1}: '{END}' without a '{BEGIN}' before it")
            # trap: ast's end_lineno is the last STATEMENT's line, so the END comment may lie past it
            holders = [f for f in functions if f[0] < begin + 1 <= f[1]]
            if not holders:
                raise UserError(f"{path}:{begin + 1}: solution region outside a function")
            _, _, name, docstring = max(holders, key=lambda f: f[0])  # the innermost function
            body = lines[begin + 1:index]
            hints = [b.strip()[len(HINT):].strip() for b in body if b.strip().startswith(HINT)]
            summary = docstring.strip().splitlines()[0] if docstring.strip() else "see its docstring"
            indent = lines[begin][:len(lines[begin]) - len(lines[begin].lstrip())]
            regions.append(Region(path, name, begin, index, indent, hints[0] if hints else summary, "\n".join(body)))
            begin = None
    if begin is not None:
        raise UserError(f"{path}:{begin + 1}: '{BEGIN}' without an '{END}'")
    return regions


def blank(source: str, regions: list[Region]) -> str:
    """`source` with the body of each region replaced by a raise (markers and HINT lines kept)."""
    lines = source.splitlines(keepends=True)
    for region in sorted(regions, key=lambda r: r.begin, reverse=True):  # bottom up: line numbers stay valid
        body = lines[region.begin + 1:region.end]
        kept = [line for line in body if line.strip().startswith(HINT)]
        message = f"implement {region.function}: {region.hint}"
        lines[region.begin + 1:region.end] = kept + [f"{region.indent}raise {STUB_ERROR}({message!r})\n"]
    return "".join(lines)


def repository_files(root: str) -> list[str]:
    """The files of the repository a student gets (relative paths, "/"-separated, sorted)."""
    try:
        listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                 cwd=root, capture_output=True, text=True, check=True).stdout
        files = [f for f in listing.split("\0") if f and os.path.isfile(os.path.join(root, f))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout, or no git: walk the tree
        files = []
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
            relative = os.path.relpath(folder, root)
            for name in names:
                path = name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")
                generated_data = relative == "data" and (name in SKIPPED_DATA or name.endswith(".jsonl"))
                if not generated_data and not name.endswith((".pyc", ".tmp")):
                    files.append(path)
    return sorted(f for f in files if f not in LEFT_OUT)


def all_regions(root: str, files: list[str]) -> list[Region]:
    regions = []
    for path in files:
        if path.endswith(".py") and not path.startswith("tests/") and path != "make_assignment.py":
            with open(os.path.join(root, path), encoding="utf-8") as f:
                source = f.read()
            if BEGIN in source:
                regions += find_regions(source, path)
    return regions


def select(regions: list[Region], only: list[str]) -> list[Region]:
    """The regions named by --only (function, Class.method or Class); all of them without --only."""
    if not only:
        return regions
    chosen = [r for r in regions if r.function in only or r.function.split(".")[0] in only]
    unknown = [name for name in only if not any(name in (r.function, r.function.split(".")[0]) for r in regions)]
    if unknown:
        raise UserError(f"--only: no solution region in {', '.join(unknown)} (see --list-regions)")
    return chosen


def read_tests(root: str) -> dict[str, str]:
    """{"tests/test_x.py::test_name": the test's source} for every test function of tests/."""
    test_dir = os.path.join(root, "tests")
    tests = {}
    for name in sorted(os.listdir(test_dir)) if os.path.isdir(test_dir) else []:
        if name.startswith("test_") and name.endswith(".py") and f"tests/{name}" not in LEFT_OUT:
            with open(os.path.join(test_dir, name), encoding="utf-8") as f:
                source = f.read()
            # one chunk per top-level test function, its decorators included
            for chunk in re.split(r"\n(?=(?:@.*\n)*def test_)", source):
                match = re.search(r"^def (test_\w+)", chunk, re.M)
                if match:
                    tests[f"tests/{name}::{match.group(1)}"] = chunk
    return tests


def grading_commands(regions: list[Region], tests: dict[str, str]) -> dict[str, str]:
    """function -> the pytest command that grades it.

    The tests of a function are the tests named after it (`-k <name>`); a function no test is named
    after (an oracle such as gae_reference, used by every test of its file) is graded by every test
    file that uses it.
    """
    commands = {}
    for region in regions:
        key = region.test_key
        named = dict.fromkeys(t.split("::")[0] for t in tests if key in t.split("::")[1])
        if named:
            commands[region.function] = f"pytest {' '.join(named)} -k {key}"
            continue
        word = region.function.split(".")[0]
        users = dict.fromkeys(t.split("::")[0] for t, source in tests.items() if re.search(rf"\b{word}\b", source))
        commands[region.function] = f"pytest {' '.join(users)}" if users else "(no test found)"
    return commands


def also_breaks(region: Region, regions: list[Region], tests: dict[str, str], command: str) -> list[str]:
    """What else fails while this region is blank: the other regions whose solution calls it, and the
    tests outside its own command that call it (e.g. a test checking ranking == pairwise for K = 2)."""
    name = region.function.split(".")[0]
    calls = re.compile(rf"\b{name}\(")
    functions = [r.function for r in regions if r is not region and r.path == region.path and calls.search(r.body)]

    def graded(test_id: str) -> bool:
        path, test = test_id.split("::")
        return path in command.split() and (" -k " not in command or region.test_key in test)

    return functions + [t.split("::")[1] for t, source in tests.items() if calls.search(source) and not graded(t)]


def write_student_copy(root: str, out: str, chosen: list[Region], files: list[str], force: bool) -> None:
    out = os.path.abspath(out)
    if os.path.commonpath([out, os.path.abspath(root)]) == out:
        raise UserError(f"--out {out} contains the repository itself")
    if os.path.exists(out) and os.listdir(out):
        if not force:
            raise UserError(f"{out} exists and is not empty (use --force to replace a previous student copy)")
        if not os.path.exists(os.path.join(out, MARKER_FILE)):
            raise UserError(f"{out} is not a student copy made by this command: not deleting it")
        shutil.rmtree(out)
    by_path: dict[str, list[Region]] = {}
    for region in chosen:
        by_path.setdefault(region.path, []).append(region)
    for path in files:
        target = os.path.join(out, path)
        if os.path.abspath(os.path.join(root, path)).startswith(out + os.sep):
            continue  # the student folder itself, when it sits inside the repository
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in by_path:
            with open(os.path.join(root, path), encoding="utf-8") as f:
                text = blank(f.read(), by_path[path])
            compile(text, path, "exec")  # a blanked file must still be valid Python
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copy2(os.path.join(root, path), target)
    with open(os.path.join(out, MARKER_FILE), "w", encoding="utf-8") as f:
        f.write("a student copy written by make_assignment.py; blanked: " +
                ", ".join(r.function for r in chosen) + "\n")


def main() -> None:
    cfg = parse_config(AssignmentConfig, {}, description=__doc__)
    files = repository_files(ROOT)
    regions = all_regions(ROOT, files)
    if not regions:
        raise UserError(f"no '{BEGIN}' regions found under {ROOT}")
    chosen = select(regions, cfg.only)
    tests = read_tests(ROOT)
    commands = grading_commands(chosen, tests)
    if cfg.list_regions:
        width = max(len(r.function) for r in chosen)
        where = {r.function: f"{r.path}:{r.begin + 1}" for r in chosen}
        where_width = max(map(len, where.values()))
        for region in chosen:
            used_by = also_breaks(region, regions, tests, commands[region.function])
            print(f"{region.function.ljust(width)}  {where[region.function].ljust(where_width)}  "
                  f"{commands[region.function]}" + (f"  (also breaks: {', '.join(used_by)})" if used_by else ""))
        return
    write_student_copy(ROOT, cfg.out, chosen, files, cfg.force)
    print(f"wrote a student copy of {len(files)} files to {cfg.out}/ with {len(chosen)} functions to implement:")
    for region in chosen:
        print(f"  {region.function:<30} {region.path:<28} {commands[region.function]}")
    print(f"students: run the commands above in {cfg.out}/ (each fails with 'implement <function>: <hint>' "
          "until the function is written)")


if __name__ == "__main__":
    run_main(main)
