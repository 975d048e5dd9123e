"""CLI start-up: wall time and peak RSS of the commands that run no model, side by side with
`python -c "import torch"` on the same machine, in one run (timings here swing: compare ratios).

    python benchmarks/startup.py [--repeat 7]

Target (issue 20): `validate`, `runs` and `history` each ≤ 0.5 s and ≤ 150 MB on the 2-core
development machine. Each command runs in a fresh interpreter; the table shows the median wall
time and the median peak resident memory of that process (`os.wait4`'s rusage, per process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of one process running `command`."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)}: exit {process.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        history = Path(tmp) / "history.sqlite"
        subprocess.run(
            [python, "-c", f"from harness.nightly.history import History\nwith History({str(history)!r}): pass"],
            cwd=ROOT,
            check=True,
        )
        commands = {
            "python (nothing)": [python, "-c", "pass"],
            'python -c "import torch"': [python, "-c", "import torch"],
            "harness validate (its local dataset read)": [
                python, "-m", "harness", "validate", "jobs/librispeech_tiny_en.yaml",
            ],
            "harness runs": [python, "-m", "harness", "runs", "--out", tmp],
            "harness history": [python, "-m", "harness", "history", "--history", str(history)],
        }  # fmt: skip
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # interleaved, so that a busy moment hits every command alike
            for name, command in commands.items():
                results[name].append(measure(command, ROOT))
    torch_s = statistics.median(w for w, _ in results['python -c "import torch"'])
    print(f"{'command':<50} {'wall s':>7} {'peak MB':>8} {'vs torch':>9}   (median of {args.repeat})")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(m for _, m in runs)
        print(f"{name:<50} {wall:>7.2f} {rss:>8.0f} {wall / torch_s:>8.2f}x")


if __name__ == "__main__":
    main()
