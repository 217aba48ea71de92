"""Tests for make_assignment.py: blanking solution regions, and a student copy that fails exactly
where it should and passes again once the solutions are put back.

This file needs the solutions, so it is the one test file a student copy leaves out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import make_assignment as ma
from minirlhf.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = re.compile(r"""raise NotImplementedError\((['"])implement ([\w.]+):""")  # the line a blanked body becomes

SOURCE = '''import math


def area(r):
    """Area of a circle of radius r."""
    # BEGIN SOLUTION
    return math.pi * r * r
    # END SOLUTION


class Counter:
    def __init__(self):
        # BEGIN SOLUTION
        # HINT: start at zero
        self.count = 0
        # END SOLUTION

    def add(self, n):
        self.check(n)
        # BEGIN SOLUTION
        self.count += n
        return self.count
        # END SOLUTION
'''


# SOURCE as the student sees it: markers, docstrings, HINT lines and the code around the regions
# stay; each region's body is one raise.
BLANKED = '''import math


def area(r):
    """Area of a circle of radius r."""
    # BEGIN SOLUTION
    raise NotImplementedError('implement area: Area of a circle of radius r.')
    # END SOLUTION


class Counter:
    def __init__(self):
        # BEGIN SOLUTION
        # HINT: start at zero
        raise NotImplementedError('implement Counter.__init__: start at zero')
        # END SOLUTION

    def add(self, n):
        self.check(n)
        # BEGIN SOLUTION
        raise NotImplementedError('implement Counter.add: see its docstring')
        # END SOLUTION
'''


def test_find_regions_names_the_function_and_its_hint():
    regions = ma.find_regions(SOURCE, "toy.py")
    found = [(r.function, r.begin + 1, r.end + 1, r.hint, r.test_key) for r in regions]
    assert found == [
        ("area", 6, 8, "Area of a circle of radius r.", "area"),          # no HINT: the docstring's first line
        ("Counter.__init__", 13, 16, "start at zero", "counter"),          # a HINT line wins
        ("Counter.add", 20, 23, "see its docstring", "counter"),           # neither
    ], found


def test_blank_replaces_each_body_with_one_raise_and_keeps_the_rest():
    text = ma.blank(SOURCE, ma.find_regions(SOURCE, "toy.py"))
    assert text == BLANKED, f"blanked source differs:\n{text}"
    namespace: dict = {}
    exec(compile(text, "toy.py", "exec"), namespace)  # still valid Python; calling a blank raises
    with pytest.raises(NotImplementedError, match="implement area: Area of a circle"):
        namespace["area"](2.0)


@pytest.mark.parametrize("source, message", [
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n", "toy.py:2: '# BEGIN SOLUTION' without an '# END SOLUTION'"),
    ("def f():\n    return 1\n    # END SOLUTION\n",
     "toy.py:3: '# END SOLUTION' without a '# BEGIN SOLUTION' before it"),
    ("def f():\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n",
     "toy.py:3: '# BEGIN SOLUTION' inside the region opened at line 2"),
    ("x = 1\n# BEGIN SOLUTION\ny = 2\n# END SOLUTION\n", "toy.py:2: solution region outside a function"),
])
def test_malformed_markers_are_clear_errors(source, message):
    with pytest.raises(UserError) as error:
        ma.find_regions(source, "toy.py")
    assert str(error.value) == message


def test_snake_case_and_select():
    assert ma.snake_case("AdaptiveKLController") == "adaptive_kl_controller"
    assert ma.snake_case("FixedKLController") == "fixed_kl_controller"
    regions = ma.find_regions(SOURCE, "toy.py")
    assert [r.function for r in ma.select(regions, ["Counter"])] == ["Counter.__init__", "Counter.add"]
    assert [r.function for r in ma.select(regions, ["Counter.add", "area"])] == ["area", "Counter.add"]
    with pytest.raises(UserError, match="--only: no solution region in volume"):
        ma.select(regions, ["volume"])


def test_every_library_region_is_found_and_graded_by_a_test():
    files = ma.repository_files(REPO)
    assert "tests/test_assignment.py" not in files, "the instructor's test must not reach students"
    assert not any(f.startswith(("out/", "student/")) or f.endswith(".pyc") for f in files)
    regions = ma.all_regions(REPO, files)
    functions = {r.function for r in regions}
    for name in ("masked_mean", "sft_loss", "ranking_reward_loss", "kl_penalty", "kl_shaped_rewards",
                 "ppo_policy_loss", "ppo_value_loss", "AdaptiveKLController.update", "gae_reference",
                 "token_logprobs_reference", "train_bpe_plain"):
        assert name in functions, f"no solution region in {name}"
    tests = ma.read_tests(REPO)
    assert "tests/test_losses.py::test_sft_loss_hand_worked" in tests
    commands = ma.grading_commands(regions, tests)
    for region in regions:
        assert commands[region.function].startswith("pytest tests/"), f"{region.function}: {commands[region.function]}"
    assert commands["sft_loss"].startswith("pytest tests/test_losses.py") and commands["sft_loss"].endswith(
        " -k sft_loss"), commands["sft_loss"]
    assert "tests/test_kernels_gae.py" in commands["gae_reference"], "the oracle is graded by its whole file"
    assert commands["train_bpe_plain"] == "pytest tests/test_tokenizer.py -k train_bpe_plain", commands["train_bpe_plain"]
    by_name = {r.function: r for r in regions}
    breaks = ma.also_breaks(by_name["masked_mean"], regions, tests, commands["masked_mean"])
    assert "sft_loss" in breaks, "masked_mean's callers break while it is blank"
    breaks = ma.also_breaks(by_name["pairwise_reward_loss"], regions, tests, commands["pairwise_reward_loss"])
    assert breaks == ["test_ranking_reward_loss_k2_equals_pairwise"], f"a test of another function calls it: {breaks}"


def pytest_outcomes(folder, *args) -> tuple[set[str], set[str]]:
    """Run pytest in `folder`; return the (failed, passed) test ids."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M))
    passed = set(re.findall(r"^PASSED (\S+)", result.stdout, re.M))
    assert failed or passed, f"pytest ran nothing:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return failed, passed


def test_student_copy_fails_exactly_on_the_blanked_functions_then_passes_with_the_solutions(tmp_path):
    student = tmp_path / "student"
    blanked = ["sft_loss", "entropy_from_logits", "FixedKLController"]  # nothing else calls them
    result = subprocess.run([sys.executable, "make_assignment.py", "--out", str(student), "--only", *blanked],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"pytest tests/test_losses\.py.* -k sft_loss", result.stdout), "the student is told how to check"
    assert not (student / "tests" / "test_assignment.py").exists() and (student / "tests" / "test_losses.py").exists()
    text = (student / "minirlhf" / "losses.py").read_text()
    assert [name for _, name in STUB.findall(text)] == ["sft_loss", "entropy_from_logits", "FixedKLController.__init__",
                                                        "FixedKLController.update"], STUB.findall(text)

    failed, passed = pytest_outcomes(student, "tests/test_losses.py")
    graded = {test for test in failed | passed
              if any(key in test for key in ("sft_loss", "entropy_from_logits", "fixed_kl_controller"))}
    assert graded, "no test grades the blanked functions"
    assert failed == graded, (f"tests that fail but should pass: {sorted(failed - graded)}; "
                              f"tests that pass but should fail: {sorted(graded - failed)}")

    shutil.copy(os.path.join(REPO, "minirlhf", "losses.py"), student / "minirlhf" / "losses.py")  # the solutions
    failed, passed = pytest_outcomes(student, "tests/test_losses.py", "-k",
                                     "sft_loss or entropy_from_logits or fixed_kl_controller")
    assert not failed and passed == graded, f"with the solutions back, still failing: {sorted(failed)}"


def test_student_copy_without_the_textbook_bpe_trainer_fails_only_its_tests(tmp_path):
    # The fast trainer (data/prepare.py's) stays: only the tests of train_bpe_plain, which compare
    # the two, fail; every other tokenizer test still runs and passes.
    student = tmp_path / "student"
    result = subprocess.run([sys.executable, "make_assignment.py", "--out", str(student), "--only", "train_bpe_plain"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pytest tests/test_tokenizer.py -k train_bpe_plain" in result.stdout
    text = (student / "minirlhf" / "tokenizer.py").read_text()
    assert [name for _, name in STUB.findall(text)] == ["train_bpe_plain"], STUB.findall(text)
    # (not the test of the real data files: a student copy has no data/, and preparing it takes a while)
    failed, passed = pytest_outcomes(student, "tests/test_tokenizer.py", "-k", "not real_data")
    graded = {test for test in failed | passed if "train_bpe_plain" in test}
    assert len(graded) >= 2, f"no test grades train_bpe_plain: {sorted(failed | passed)}"
    assert failed == graded, (f"tests that fail but should pass: {sorted(failed - graded)}; "
                              f"tests that pass but should fail: {sorted(graded - failed)}")


def test_default_copy_blanks_every_region_and_still_imports(tmp_path):
    student = tmp_path / "hw"
    files = ma.repository_files(REPO)
    regions = ma.all_regions(REPO, files)
    ma.write_student_copy(REPO, str(student), regions, files, force=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    check = subprocess.run([sys.executable, "-c", "import minirlhf.losses, minirlhf.kernels, minirlhf.ppo"],
                           cwd=student, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"the student copy must import:\n{check.stderr}"
    blanked = sum(len(STUB.findall(open(student / path).read())) for path in {r.path for r in regions})
    assert blanked == len(regions)

    with pytest.raises(UserError, match="not empty"):
        ma.write_student_copy(REPO, str(student), regions, files, force=False)
    ma.write_student_copy(REPO, str(student), regions[:1], files, force=True)  # a previous copy may be replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a student copy"):
        ma.write_student_copy(REPO, str(tmp_path / "mine"), regions, files, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious", "--force deletes only student copies"
    with pytest.raises(UserError, match="contains the repository"):
        ma.write_student_copy(REPO, os.path.dirname(REPO), regions, files, force=True)
