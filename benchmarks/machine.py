"""A one-line description of the machine a benchmark ran on, and of the code it ran."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def describe_machine() -> str:
    import sklearn
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}; "
            f"{describe_code()}")


def command_line(module: str, argv=None) -> str:
    """The command that runs benchmark ``module`` (``"accuracy"``) with the arguments
    ``argv`` (``None``: this process's), as a report shows it."""
    return (f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)).strip()


def describe_code() -> str:
    """``"sklearn-moe <version>"``, with the git commit of the checkout it runs from (and
    whether the package's or the benchmarks' code differs from it) where there is one."""
    import sklearn_moe

    text = f"sklearn-moe {sklearn_moe.__version__}"
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        # The results a run writes are not the code it ran: they do not count as changes.
        changed = subprocess.run([*git, "status", "--porcelain", "--", "sklearn_moe", "benchmarks",
                                  ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return text
    if commit.returncode != 0 or not commit.stdout.strip():
        return text
    return text + f" at commit {commit.stdout.strip()}" + (" with local changes" if changed.stdout.strip() else "")
