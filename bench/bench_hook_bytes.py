"""Bytes of temporaries that one layer's statistics allocate (capture's post-hook), eager vs fused, on a CPU.

    python bench/bench_hook_bytes.py [--hidden 4096] [--batch-size 4] [--seq-len 2048] [--dtype bfloat16]
                                     [--skip-real]

The hook's per-token terms (`metrics/token_terms.layer_terms`: influence, variance, updates with both
sublayers, activations) of a bf16 layer input x, output y and sublayer outputs a, m of shape
[batch, seq, hidden] (default: Llama-3-8B at T = 2048, batch 4), measured three ways:

  tracked   the eager path under FakeTensorMode with layerprobe.memory's StorageTracker (nothing
            allocated): the peak of live temporaries and the sum of every temporary's bytes;
  real      the eager path and the compiled one (`fused_layer_terms`, Inductor's C++ backend on this CPU:
            the same fusion decisions as on CUDA, other code generation) on real tensors, each as the
            growth of the peak resident set (VmHWM, reset before) in a fresh subprocess with malloc's mmap
            threshold fixed, so that freed tensors leave the resident set.

The steady state is measured (after the first batch: no decomposition check). The compiled run's
first call compiles (tens of seconds here; cached on disk after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

import torch

from layerprobe.memory import StorageTracker
from layerprobe.metrics import token_terms

MIB = 1 << 20
GROUPS = dict(influence=True, variance=True, updates=True, activations=True, parallel=False, check=False)


class TotalTracker(StorageTracker):
    """StorageTracker that also adds up every new storage's bytes (what the path writes, not only its peak)."""

    def __init__(self):
        super().__init__()
        self.total = defaultdict(int)

    def _track(self, t):
        try:
            key, size = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if key not in self._seen:
            self.total[str(t.device)] += size
        super()._track(t)


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    return x, (x.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype), \
        (0.05 * torch.randn(shape, generator=g)).to(dtype), (0.05 * torch.randn(shape, generator=g)).to(dtype)


def tracked(shape, dtype) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y, a, m = (torch.empty(shape, dtype=dtype) for _ in range(4))
        tracker = TotalTracker()
        tracker.register([x, y, a, m])
        with tracker:
            token_terms.layer_terms(x, y, a, m, **GROUPS)
    return {"peak": tracker.peak["cpu"], "total": tracker.total["cpu"]}


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1))


def real(shape, dtype, fused: bool) -> dict:
    """One path on real tensors in this process: growth of the peak resident set over the inputs."""
    torch.set_num_threads(1)
    x, y, a, m = _inputs(shape, dtype)
    if fused:
        token_terms.FUSED_DEVICES = frozenset({"cpu"})
    fn = token_terms.fused_layer_terms if fused else token_terms.layer_terms
    start = time.perf_counter()
    fn(x, y, a, m, **GROUPS)  # once before: compiles, and pages in the code either path runs
    compile_s = time.perf_counter() - start
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _kb("VmRSS")
    start = time.perf_counter()
    out = fn(x, y, a, m, **GROUPS)
    seconds = time.perf_counter() - start
    result = {"peak": (_kb("VmHWM") - base) * 1024, "seconds": seconds,
              "outputs": sum(t.nbytes for v in out.values() for t in (v if isinstance(v, tuple) else (v,)))}
    if fused:
        assert token_terms._broken is None, token_terms._broken
        result["compile_s"] = compile_s
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--skip-real", action="store_true", help="only the tracked (fake) measurement")
    ap.add_argument("--_real", choices=["eager", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape, dtype = (args.batch_size, args.seq_len, args.hidden), getattr(torch, args.dtype)
    if args._real:
        print(json.dumps(real(shape, dtype, args._real == "fused")))
        return
    one = args.batch_size * args.seq_len * args.hidden * 4
    print(f"shape {shape} {args.dtype}; one float32 copy of a layer's stream = {one / MIB:.0f} MiB")
    t = tracked(shape, dtype)
    print(f"eager, tracked (fake):  peak {t['peak'] / MIB:8.1f} MiB ({t['peak'] / one:.1f} copies)   "
          f"every temporary {t['total'] / MIB:8.1f} MiB ({t['total'] / one:.1f} copies)")
    if args.skip_real:
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for path in ("eager", "fused"):
        cmd = [sys.executable, __file__, "--hidden", str(args.hidden), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--dtype", args.dtype, "--_real", path]
        r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        extra = f", compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""
        print(f"{path:5s}, real (VmHWM):   peak {r['peak'] / MIB:8.1f} MiB ({r['peak'] / one:.2f} copies)   "
              f"outputs {r['outputs'] / MIB:.2f} MiB   one call {r['seconds']:.2f} s{extra}")


if __name__ == "__main__":
    main()
