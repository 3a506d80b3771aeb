"""How fast `layerprobe --help` and an option error answer (issue 11.3's target: under 0.5 s).

    python bench/bench_cli.py [--repeats 10] [--baseline /path/to/another/checkout]

Each run is a fresh `python -m layerprobe ARGS` process with this checkout first on PYTHONPATH. With
--baseline, runs of that checkout alternate with this one's (paired, so background load falls on both
sides). Reported per command: the median wall time and the median CPU time (user + system of the
child process, from getrusage), which load on a shared machine inflates far less than wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["compare", "--help"], ["compare", "x", "--depth", "sideways"]]


def one_run(root: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `python -m layerprobe ARGS` from the checkout at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "layerprobe", *args], env=env, cwd=root, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--baseline", type=Path, help="another checkout to compare with (e.g. the previous commit)")
    a = ap.parse_args()
    sides = {"this": REPO} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    print(f"python {platform.python_version()} · {platform.machine()} · {os.cpu_count()} cores · "
          f"load {os.getloadavg()[0]:.2f} · {a.repeats} paired runs")
    for args in COMMANDS:
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        for _ in range(a.repeats):
            for name, root in sides.items():  # alternate the sides
                times[name].append(one_run(root, args))
        for name in sides:
            wall = statistics.median(t[0] for t in times[name])
            cpu = statistics.median(t[1] for t in times[name])
            print(f"layerprobe {' '.join(args):<32} {name:<8}  wall {wall:6.2f} s   cpu {cpu:6.2f} s")


if __name__ == "__main__":
    main()
