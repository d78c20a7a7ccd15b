"""Shared helpers of the benchmarks: fresh-subprocess measurement, environment line, tables, plots.

Every benchmark here reports *ratios measured in one run*: the variants run interleaved, round
after round, on the same machine at the same time, so load from other processes falls on all of
them alike. Absolute seconds are printed for context only.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def env_with_src(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with the repository's src/ first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


@dataclass
class ProcessRun:
    """One command run to completion in a fresh process."""

    wall_seconds: float  # from fork to reaped exit: the whole process, imports and saving included
    peak_rss_bytes: int  # the child's own ru_maxrss (os.wait4), not the maximum over all children
    user_seconds: float
    system_seconds: float
    minor_faults: int
    returncode: int
    stdout: str
    stderr: str


def run_process(command: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                timeout: float = 1800) -> ProcessRun:
    """Run `command` and measure it with wait4: wall time and this child's peak resident memory."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env or env_with_src(), cwd=cwd)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
        return ProcessRun(wall, usage.ru_maxrss * scale, usage.ru_utime, usage.ru_stime, usage.ru_minflt,
                          process.returncode, out.read(), err.read())


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {load:.1f} at start, Python {platform.python_version()}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Table:
    header: list[str]
    align: list[str] = field(default_factory=list)  # "l" or "r" per column
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        align = self.align or ["l"] + ["r"] * (len(self.header) - 1)
        lines = ["| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
