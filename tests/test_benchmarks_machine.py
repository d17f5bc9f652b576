"""The benchmark reports name the machine and the code they ran."""

import shutil
import subprocess

import pytest

import sklearn_moe
from benchmarks import machine


def test_the_description_names_the_version_and_the_checkouts_commit():
    text = machine.describe_machine()
    assert text.endswith(machine.describe_code())
    assert f"sklearn-moe {sklearn_moe.__version__}" in text
    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    head = subprocess.run(["git", "-C", str(machine.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert f" at commit {head.stdout.strip()}" in text


def test_without_git_the_description_still_names_the_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    assert machine.describe_code() == f"sklearn-moe {sklearn_moe.__version__}"
