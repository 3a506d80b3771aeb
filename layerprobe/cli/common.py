"""What every command shares: consoles, and turning user errors into one line and an exit code."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from ..errors import LayerprobeError

# Messages and tables carry user strings (model names, paths) that may look like rich markup ("m[/]x"):
# these consoles print every string literally; styled parts are Text objects. Lines of prose are left to the
# terminal to wrap (soft_wrap): a path is never cut by a newline, and the text is the same at any width. Tables are
# still laid out to the terminal's width (their columns set their own wrapping).
console = Console(markup=False, soft_wrap=True)  # results: tables go to stdout
err_console = Console(stderr=True, markup=False, soft_wrap=True)  # progress bars and errors go to stderr


def fail(message: str, code: int = 2) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func):
    """Run a command; LayerprobeError becomes `error: ...` with exit 2, Ctrl-C exit 130, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LayerprobeError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130)
        except MemoryError:
            fail("ran out of memory: lower --batch-size, --samples or --seq-len")
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                fail("ran out of GPU memory: lower --batch-size or --seq-len, or use --device-map auto")
            raise

    return wrapper


# Options every model-reading command takes, declared once so analyze and prune-sweep agree.
ModelArg = Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file, a train-reference run, or 'smollm2'.")]
DataOpt = Annotated[str, typer.Option(help="builtin | file (.txt .jsonl .csv .parquet .npy) | folder | hf:NAME[:CONFIG[:SPLIT]]")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per sample.")]
SamplesOpt = Annotated[int, typer.Option(help="Number of samples (blocks of --seq-len tokens).")]
BatchSizeOpt = Annotated[int, typer.Option(help="Samples per forward pass.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the choice of blocks.")]
TextColumnOpt = Annotated[Optional[str], typer.Option(help="Column holding the text in .jsonl/.csv/.parquet/hf data.")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPU).")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="auto | balanced | balanced_low_0 | sequential: spread the model over the GPUs, offloading what does not fit to cpu/disk (accelerate).")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (accelerate's max_memory).")]
OffloadFolderOpt = Annotated[Optional[Path], typer.Option(help="With --device-map: folder for disk-offloaded weights that are not safetensors (GGUF, .bin).")]
AttnImplementationOpt = Annotated[Optional[str], typer.Option(help="eager | sdpa | flash_attention_2 | flash_attention_3 | flex_attention (transformers; default: the model's).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own code.")]
LayersPathOpt = Annotated[Optional[str], typer.Option(help="Dotted path of the layer list, e.g. transformer.h.")]
OutOpt = Annotated[Optional[Path], typer.Option(help="Output folder (default reports/<model-name>/).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def check_processes_early(samples: int | None, device_map: str | None) -> None:
    """Under torchrun (WORLD_SIZE > 1), the process checks of `distributed.check_processes`, with the model's
    other option checks; alone, nothing is imported (torch included)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..distributed import check_processes

        check_processes(samples, int(os.environ["WORLD_SIZE"]), device_map)


@contextlib.contextmanager
def data_parallel(device: str, samples: int | None, device_map: str | None):
    """Under `torchrun --nproc-per-node N`: the process checks (before any weight loads), then the process
    group (before the model loads, so that on CUDA each process's model lands on its own GPU, LOCAL_RANK, or
    with --device-map on its own group of GPUs, `distributed.gpu_group`);
    yields the DistEnv (world size 1 without torchrun) and ends the group after the command."""
    from ..distributed import DistEnv, check_processes, init_distributed, requested_world_size, shutdown
    from ..errors import LayerprobeError

    world = requested_world_size()
    check_processes(samples, world, device_map)
    if world > 1 and device not in ("auto", "cpu", "cuda"):
        raise LayerprobeError(f"--device {device} with {world} processes: data-parallel runs use cpu (gloo) or "
                              "cuda (NCCL, one GPU per process)")
    env = init_distributed(device, device_map) if world > 1 else DistEnv()
    try:
        yield env  # the command ends with a collective (main_first around the writing)
    finally:
        shutdown(env)
