"""How long `layerprobe demo --fresh` takes, on a quiet machine and with CPU-bound work beside it (issue 11.1's
targets on 2 cores: at most 4 minutes quiet, at most 1.5× that with two other CPU-bound processes running).

    python bench/bench_demo.py [--pairs 1] [--burners 2] [--workers N] [--runs DIR] [-- demo options]

Each run is a fresh `python -m layerprobe demo --fresh -q` process with this checkout first on PYTHONPATH,
writing to a temporary folder (or --runs DIR for the checkpoints, e.g. runs/demo to reuse them afterwards).
Runs alternate: quiet, then with `--burners` processes of `while True: pass` started by this script and
stopped when the demo ends. Reported per run: wall time, the CPU time of the demo and all its worker
processes (user + system, from getrusage), the load average before it started, and the ratio of the
loaded wall time to the quiet one. Other work on the machine raises both wall times; say what it was.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def one_run(extra: list[str], burners: int, runs: Path | None) -> dict:
    """Wall and CPU seconds of one `layerprobe demo --fresh` with `burners` busy loops beside it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
            args = ["demo", "--fresh", "-q", "--out", str(Path(tmp) / "report"),
                    "--runs", str(runs or Path(tmp) / "runs"), *extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "layerprobe", *args], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # before the burners are reaped: not theirs
    finally:
        for p in spinning:
            p.kill()
            p.wait()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"demo failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"burners": burners, "wall": wall, "cpu": cpu, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1, help="quiet/loaded pairs of runs")
    ap.add_argument("--burners", type=int, default=2, help="busy loops beside the loaded run (0: quiet runs only)")
    ap.add_argument("--runs", type=Path, default=None, help="keep the quiet runs' checkpoints here")
    ap.add_argument("demo_args", nargs="*", help="more `layerprobe demo` options, after --")
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {available_cores()} cores available, "
          f"python {platform.python_version()}; command: layerprobe demo --fresh -q {' '.join(a.demo_args)}")
    rows = []
    for i in range(a.pairs):
        for burners in ((0, a.burners) if a.burners else (0,)):
            r = one_run(a.demo_args, burners, a.runs if burners == 0 else None)
            rows.append(r)
            print(f"pair {i + 1}, {burners} burner(s): wall {r['wall'] / 60:.2f} min, CPU {r['cpu'] / 60:.2f} min, "
                  f"load before {r['load']:.1f}",
                  flush=True)
    quiet = [r["wall"] for r in rows if r["burners"] == 0]
    loaded = [r["wall"] for r in rows if r["burners"] > 0]
    if not loaded:
        print(f"quiet: {min(quiet) / 60:.2f} min (best of {len(quiet)})")
        return
    print(f"quiet: {min(quiet) / 60:.2f} min (best of {len(quiet)}); with {a.burners} burners: "
          f"{min(loaded) / 60:.2f} min; ratio {min(loaded) / min(quiet):.2f}")


if __name__ == "__main__":
    main()
