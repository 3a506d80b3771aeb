"""Cost of layerprobe.monitor inside a training loop: the monitor's overhead on a step without a probe, and
what one probe costs next to a plain forward of the probe batch.

The reference model (Pre-LN) at a preset's shape, fp32 on the CPU, forward + backward + clip + AdamW. Three
kinds of step alternate on the same model and optimizer, round after round (who goes first rotates): plain;
logged (after_backward + after_step recording a row: gradient norms per layer and sublayer, the weight copy
and update sizes, one JSON line); unlogged (the monitor called on a step between two logged ones). The
overhead reported is the median over rounds of (time / plain time) − 1, so load from other processes hits
all alike; with `every=k` a run pays the logged overhead on one step in k. The time spent inside the two
calls is also timed from within the loop ("calls"), as a share of the plain step: on a loaded machine the
wall-clock ratios are noisy, that share is less so; `--clock cpu` times everything in this process's CPU
time, which other processes taking the cores do not inflate.

    python bench/bench_monitor.py                       # tiny and 71m on the CPU
    python bench/bench_monitor.py --threads 1 --rounds 3 --steps-per-round 1 --clock cpu   # as BENCHMARKS.md
    python bench/bench_monitor.py --presets tiny --rounds 9 --json bench/monitor.json
    python bench/bench_monitor.py --squares --presets 71m   # only the float64 sums of squares, two ways

`--squares` times what dominated a logged step before: float64 squared norms of every parameter of a
model at the preset's shape, `metrics.squares.squared_sums` (chunked into a float64 buffer on the CPU)
against one `torch._foreach_norm(dtype=float64)` (a float64 copy of each whole tensor), alternated.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from layerprobe.monitor import LayerMonitor
from layerprobe.reference import LayerprobeForCausalLM, reference_config

CPU_SHAPES = {"micro": (8, 32), "tiny": (16, 128), "71m": (4, 256)}  # as bench_train_throughput.py
PROBE_SHAPE = (4, 128)  # the probe batch: samples x tokens


def bench(preset: str, rounds: int, steps_per_round: int, warmup: int, out: str, clock=time.perf_counter) -> dict:
    b, s = CPU_SHAPES[preset]
    cfg = reference_config(preset, "pre", max_position_embeddings=max(s, PROBE_SHAPE[1]))
    torch.manual_seed(0)
    model = LayerprobeForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    probe = torch.randint(0, cfg.vocab_size, PROBE_SHAPE)
    monitor = LayerMonitor(model, out=out, every=1, probe=probe, probe_every=10**9)  # no probe in the timed steps
    idle = LayerMonitor(model, every=10**9)  # called every step, records nothing: a step between logged ones

    def step(kind: str):
        m = {"logged": monitor, "unlogged": idle}.get(kind)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        t0 = clock()
        if m:
            m.after_backward(max_norm=1.0)
        t1 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t2 = clock()
        if m:
            m.after_step(loss=loss)
        inside[kind].append(t1 - t0 + clock() - t2)
        opt.zero_grad(set_to_none=True)

    def timed(kind: str) -> float:
        t = clock()
        for _ in range(steps_per_round):
            step(kind)
        return (clock() - t) / steps_per_round

    kinds = ["plain", "logged", "unlogged"]
    inside = {k: [] for k in kinds}  # seconds spent in the monitor's two calls, per step
    for _ in range(warmup):
        for kind in kinds:
            step(kind)
    times = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # who goes first rotates
            times[kind].append(timed(kind))
    ratios = {k: [m / p for m, p in zip(times[k], times["plain"])] for k in ("logged", "unlogged")}

    # One probe against one plain no_grad forward of the probe batch, alternated the same way.
    def forward():
        with torch.no_grad():
            model.eval()
            model(input_ids=probe, use_cache=False)
            model.train()

    probe_ratios, probe_s = [], []
    for r in range(rounds):
        t0 = clock()
        monitor._probe_row()
        t1 = clock()
        forward()
        t2 = clock()
        probe_ratios.append((t1 - t0) / (t2 - t1))
        probe_s.append(t1 - t0)
    monitor.close()
    return {"preset": preset, "batch": b, "seq_len": s, "params": sum(p.numel() for p in model.parameters()),
            "plain_s_per_step": statistics.median(times["plain"]),
            "logged_s_per_step": statistics.median(times["logged"]),
            "overhead_logged": statistics.median(ratios["logged"]) - 1,
            "overhead_logged_min": min(ratios["logged"]) - 1, "overhead_logged_max": max(ratios["logged"]) - 1,
            "overhead_unlogged": statistics.median(ratios["unlogged"]) - 1,
            # The calls timed from inside the loop, over the plain step: far less exposed to other load.
            "calls_logged_s": statistics.median(inside["logged"]),
            "calls_logged_share": statistics.median(inside["logged"]) / statistics.median(times["plain"]),
            "calls_unlogged_share": statistics.median(inside["unlogged"]) / statistics.median(times["plain"]),
            "probe_s": statistics.median(probe_s), "probe_over_forward": statistics.median(probe_ratios),
            "probe_shape": list(PROBE_SHAPE)}


def bench_squares(preset: str, rounds: int) -> dict:
    from layerprobe.metrics.squares import squared_sums

    torch.manual_seed(0)
    model = LayerprobeForCausalLM(reference_config(preset, "pre"))
    tensors = [p.detach() for p in model.parameters()]
    ways = {"squared_sums": lambda: squared_sums(tensors),
            "foreach_norm_float64": lambda: torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()}
    times = {k: [] for k in ways}
    for r in range(rounds):
        for name in list(ways)[r % 2:] + list(ways)[:r % 2]:
            t = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - t)
    a, b = ways["squared_sums"](), ways["foreach_norm_float64"]()
    return {"preset": preset, "entries": sum(t.numel() for t in tensors),
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            "max_rel_diff": float(((a - b).abs() / b.clamp_min(1e-300)).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,71m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--squares", action="store_true", help="only time the float64 sums of squares, two ways")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (time.process_time), not slowed by other processes "
                         "taking the cores; wall: time.perf_counter")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.squares:
        for preset in args.presets.split(","):
            r = bench_squares(preset.strip(), args.rounds)
            print(f"{r['preset']}: {r['entries']:,} entries, squared_sums {r['squared_sums_s']:.4f} s, "
                  f"_foreach_norm(float64) {r['foreach_norm_float64_s']:.4f} s, max relative difference "
                  f"{r['max_rel_diff']:.1e} (median of {args.rounds}, {torch.get_num_threads()} threads)")
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(f"# CPU fp32, forward+backward+clip+AdamW; logged: a step that records a row (gradient norms, weight "
          f"update); unlogged: the monitor called, no row; {info}")
    print(f"{'preset':>6} {'params':>11} {'batch x seq':>12} {'plain s/step':>13} {'logged':>8} "
          f"{'(min..max)':>16} {'unlogged':>9} {'calls logged':>13} {'calls unlogged':>15} {'probe s':>8} "
          f"{'probe/forward':>14}")
    results = {"info": info, "cpu": []}
    with tempfile.TemporaryDirectory() as out:
        for preset in args.presets.split(","):
            r = bench(preset.strip(), args.rounds, args.steps_per_round, args.warmup, out, clock)
            results["cpu"].append(r)
            print(f"{r['preset']:>6} {r['params']:>11,} {r['batch']:>5} x {r['seq_len']:<5} "
                  f"{r['plain_s_per_step']:>13.4f} {r['overhead_logged']:>+8.1%} "
                  f"{r['overhead_logged_min']:>+7.1%}..{r['overhead_logged_max']:<+7.1%} "
                  f"{r['overhead_unlogged']:>+9.1%} {r['calls_logged_share']:>13.2%} {r['calls_unlogged_share']:>15.3%} "
                  f"{r['probe_s']:>8.3f} {r['probe_over_forward']:>14.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
