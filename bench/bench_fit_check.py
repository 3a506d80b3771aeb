"""How long the fit check's prediction takes, and how far the depth shortcut is from tracking every layer.

    python bench/bench_fit_check.py [--models llama3-8b,llama3-70b] [--batch-size 4] [--seq-len 2048]
                                    [--modes grad,no-grad] [--full]

For each full-size config (bench_memory.MODELS, no hub) this times what `analyze` does on a GPU before any
weight loads: the model built from its config under FakeTensorMode (`memory.fake_model`) and
`analysis.predict_memory` on it, tracked on the first 2P and 3P layers and extrapolated to the depth.
`--full` also tracks every layer and prints the shortcut's error on the tracked peak and on the predicted
CUDA peak. `--check` instead times `analysis.check_fits_before_loading` itself, as `analyze` calls it
(config.json read from a folder, model built, predicted), with the free memory set so that the run fits (one
prediction) and then so that it is refused (a second prediction at batch 1). Run one model per process to
include the first use of FakeTensorMode. bf16 weights; times are wall seconds on this machine's CPU (one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MODELS  # noqa: E402

from layerprobe import analysis  # noqa: E402
from layerprobe.memory import GIB, depth_samples, fake_mode, fake_model  # noqa: E402


def config_of(name: str):
    import transformers

    cls_name, kwargs = MODELS[name]
    return getattr(transformers, cls_name)(**kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--modes", default="grad,no-grad")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--full", action="store_true", help="also track every layer and print the shortcut's error")
    ap.add_argument("--check", action="store_true", help="time the check before loading, end to end")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.check:
        return check(args)
    print(f"batch {args.batch_size} x {args.seq_len} tokens, bfloat16; seconds of wall time; GiB", flush=True)
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            grad = mode == "grad"
            with fake_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                started = time.perf_counter()
                net = fake_model(config_of(name), torch.bfloat16)
                built = time.perf_counter() - started
                depths = depth_samples(analysis.find_anatomy(net).layers)
                started = time.perf_counter()
                quick = analysis.predict_memory(net, batch_size=args.batch_size, seq_len=args.seq_len, grad=grad,
                                                build=False)
                quick_s = time.perf_counter() - started
                line = (f"{name:11s} {mode:8s} build {built:5.1f} s  predict {quick_s:5.1f} s (layers {depths})  "
                        f"tracked {quick.tracked / GIB:7.3f}  CUDA {quick.cuda / GIB:6.2f}")
                if args.full:
                    started = time.perf_counter()
                    full = analysis.predict_memory(net, batch_size=args.batch_size, seq_len=args.seq_len, grad=grad,
                                                   build=False, by_depth=False)
                    full_s = time.perf_counter() - started
                    line += (f"  | every layer {full_s:5.1f} s: tracked {full.tracked / GIB:7.3f}  CUDA "
                             f"{full.cuda / GIB:6.2f}  error tracked {quick.tracked / full.tracked - 1:+.2e}, "
                             f"CUDA {quick.cuda / full.cuda - 1:+.2e} ({quick.tracked - full.tracked:+d} bytes)")
            print(line, flush=True)
    return 0


def check(args) -> int:
    """check_fits_before_loading on a folder holding the config (and an empty weights file: nothing is read)."""
    import tempfile

    from layerprobe.errors import LayerprobeError
    from layerprobe.memory import weight_bytes

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            config_of(name).save_pretrained(folder)
            (Path(folder) / "model.safetensors").touch()
            for mode in args.modes.split(","):
                times = []
                for refused in (False, True):
                    analysis._PREDICTED.clear()
                    if refused:  # 1 GiB over the weights: refused after a second prediction, at batch 1
                        with fake_mode(), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            weights = sum(weight_bytes(fake_model(config_of(name), torch.bfloat16)).values())
                    free = weights + GIB if refused else 1 << 50
                    analysis.device_free_bytes = lambda device: free
                    started = time.perf_counter()
                    try:
                        analysis.check_fits_before_loading(folder, seq_len=args.seq_len, samples=None,
                                                           batch_size=args.batch_size, grad=mode == "grad",
                                                           dtype="bfloat16", device="cpu")
                        outcome = "fits"
                    except LayerprobeError as e:
                        outcome = f"refused: {e}"
                    times.append((time.perf_counter() - started, outcome))
                print(f"{name:11s} {mode:8s} check {times[0][0]:5.1f} s ({times[0][1]});  "
                      f"{times[1][0]:5.1f} s ({times[1][1]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
