"""`LayerMonitor`: per-layer depth health inside anyone's training loop.

    monitor = LayerMonitor(model, out="runs/mine", every=10, probe=probe_ids, probe_every=100)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        monitor.after_backward(max_norm=1.0)   # gradient norms before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        monitor.after_step(loss=loss)          # update sizes, the probe, one row to metrics.jsonl
        optimizer.zero_grad()

Every `every` optimizer steps it records, per layer and per attention / MLP / norm sublayer, the L2 norm
of the accumulated gradient before clipping (`metrics.grad_norms_by_group`, the function analyze and
train-reference use), the total norm and the clip factor, and each layer's weight update
‖Δθ‖/‖θ‖ (`metrics.weights`). Every `probe_every` steps it runs analyze's hooked forward on a fixed probe
batch (`probe.probe_statistics`). Rows go to OUT/metrics.jsonl in train-reference's format (one line per
logged step, per-layer values as lists), so `layerprobe compare OUT` reads a monitored run as it reads a
reference run.

Distributed (torch.distributed already initialised by the caller): under DDP the gradients after the
backward and the weights after the step are the same on every process, so each measures them locally and
no collective is needed; under FSDP2 each process holds shards, and the squared sums of every group
(gradients, weight changes, weights) are packed into one tensor and summed with one all-reduce per logged
step. The probe runs on every process (FSDP2's forward needs them all); only rank 0 writes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..anatomy import Anatomy, find_anatomy
from ..capture import TOKENS
from ..errors import LayerprobeError
from ..io import check_output_dir, ensure_writable_dir, write_json
from ..metrics import clip_factor, gradient_squares, weight_change_sums, weight_update_ratio
from .probe import check_probe, probe_statistics
from .writers import check_writers, json_lines, open_writers

LOG_FILE = "metrics.jsonl"  # the name train-reference uses: `layerprobe compare` reads either
MANIFEST_FILE = "monitor.json"
KINDS = ("attention", "mlp", "norm")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _find(model: nn.Module, layers_path: str | None) -> Anatomy:
    """`analyze`'s discovery; when it fails, one message that says what was searched and names layers_path=."""
    from ..anatomy import KNOWN_PATHS, num_layers_of

    try:
        return find_anatomy(model, layers_path)
    except LayerprobeError:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        shown = ", ".join(lists[:5]) or "none"
        if layers_path:
            raise LayerprobeError(f"layers_path={layers_path!r} does not name a list of layers in this model "
                                  f"(its module lists: {shown})") from None
        paths = ", ".join(dict.fromkeys(p for p, _ in KNOWN_PATHS))
        expected = num_layers_of(getattr(model, "config", None)) if hasattr(model, "config") else None
        count = f"of {expected} entries (the config's layer count)" if expected else "at all"
        raise LayerprobeError(f"could not find this model's list of layers: searched {paths}, then every "
                              f"nn.ModuleList {count} (found: {shown}); pass layers_path='...' naming the "
                              "module list that holds the layers, e.g. layers_path='transformer.h'") from None


def _positive_int(name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise LayerprobeError(f"{name} must be an integer >= {0 if allow_zero else 1}, not {value!r}")
    return value


class LayerMonitor:
    """Per-layer gradient norms, weight updates and (every `probe_every` steps) analyze's statistics on a
    fixed probe batch, logged while a model trains. See the module docstring for the two calls a loop makes.

    model:        any nn.Module whose layer list layerprobe finds (as `analyze` does), DDP/compile wrappers
                  included; `layers_path` names the list when it cannot be found.
    out:          the run folder: metrics.jsonl (appended to) and monitor.json go there; None writes no file.
    every:        record gradient norms and weight updates every `every` optimizer steps.
    probe:        [batch, tokens] token ids, the fixed batch the probe reads (kept on the CPU between probes).
    probe_every:  run the probe every `probe_every` steps (default 100 when a probe is given).
    tokens:       "last" or "all": the angular distance's and logit lens's tokens, as analyze's --tokens.
    tensorboard:  also write scalars to OUT/tensorboard (needs the tensorboard package).
    wandb:        also log to the active Weights & Biases run (needs wandb and wandb.init() first).
    step:         the number of optimizer steps already taken (a resumed run); rows count on from it.
    """

    def __init__(self, model: nn.Module, *, out: str | os.PathLike | None = None, every: int = 1,
                 probe=None, probe_every: int | None = None, layers_path: str | None = None,
                 tokens: str = "last", tensorboard: bool = False, wandb: bool = False, step: int = 0):
        self.every = _positive_int("every", every)
        self.step = _positive_int("step", step, allow_zero=True)
        if tokens not in TOKENS:
            raise LayerprobeError(f"tokens must be one of {', '.join(TOKENS)}, not {tokens!r}")
        if probe_every is not None and probe is None:
            raise LayerprobeError("probe_every was given without a probe batch; pass probe=<[batch, tokens] ids>")
        self.probe_every = _positive_int("probe_every", probe_every if probe_every is not None else 100) \
            if probe is not None else 0
        self.tokens = tokens
        self.wrapper = model
        self.model = unwrap_model(model)
        self.anatomy = _find(self.model, layers_path)
        self.rank, self.world_size = _dist()
        config = getattr(self.model, "config", None)
        self.probe = None
        if probe is not None:
            self.probe = check_probe(probe, _vocab(self.model, self.anatomy), _context(config)).cpu()
        self._groups = self._parameter_groups()
        self._params = [p for _, _, ps in self._groups for p in ps]  # each parameter once, group after group
        # Each layer's parameters, listed once (walking the modules every logged step costs ~1% of a tiny step).
        self._layer_params = [list(layer.parameters()) for layer in self.anatomy.layers]
        self.out = Path(out).expanduser() if out is not None else None
        self._log = None
        self._writers = []
        if self.rank == 0:
            if self.out is not None:
                check_output_dir(self.out, option="out=")
            check_writers(self.out, tensorboard=tensorboard, wandb=wandb)  # before anything is created
            if self.out is not None:
                ensure_writable_dir(self.out)
                write_json(self.out / MANIFEST_FILE, self._manifest())
                self._log = json_lines(self.out / LOG_FILE)
            self._writers = open_writers(self.out, tensorboard=tensorboard, wandb=wandb)
        self._phase = "step"  # "step": waiting for after_backward; "backward": waiting for after_step
        self._grad_sq: torch.Tensor | None = None  # per parameter (self._params), float64
        self._measured: list[bool] = []  # which parameters had a gradient
        self._reduced = False  # _grad_sq already summed over FSDP shards (grad_norm() was asked)
        self._max_norm: float | None = None
        self._before: list[list[torch.Tensor]] | None = None
        self._buffer: list[list[torch.Tensor]] | None = None  # the weights before the step (logged steps)
        self.last: dict | None = None  # the last row written

    # -- setup ---------------------------------------------------------------------------------
    def _parameter_groups(self) -> list[tuple[int | None, str, list[nn.Parameter]]]:
        """(layer, kind, parameters) per top-level child of every layer, then (None, "outside", the rest):
        analyze's grouping (`Anatomy.parameter_groups`), each parameter in exactly one group."""
        groups, inside = [], set()
        for i in range(self.anatomy.num_layers):
            kinds = {name: kind for name, (kind, _) in self.anatomy.sublayers(i).items()}
            for child, params in self.anatomy.parameter_groups(i).items():
                ps = [p for _, p in params]
                inside.update(id(p) for p in ps)
                groups.append((i, kinds.get(child, "other"), ps))
        rest = [p for p in self.model.parameters() if id(p) not in inside]
        groups.append((None, "outside", rest))
        return groups

    def _manifest(self) -> dict:
        a = self.anatomy
        return {"monitor": {"model": getattr(getattr(self.model, "config", None), "_name_or_path", "") or
                            type(self.model).__name__, "model_type": a.model_type, "num_layers": a.num_layers,
                            "layers_path": a.layers_path, "norm_scheme": a.norm_scheme, "every": self.every,
                            "probe_every": self.probe_every,
                            "probe_shape": list(self.probe.shape) if self.probe is not None else None,
                            "tokens": self.tokens, "world_size": self.world_size, "first_step": self.step + 1}}

    # -- the two calls -------------------------------------------------------------------------
    def logs(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) records gradients and weight updates."""
        return step % self.every == 0

    def probes(self, step: int) -> bool:
        return self.probe is not None and step % self.probe_every == 0

    def after_backward(self, max_norm: float | None = None, *, record: bool | None = None) -> None:
        """Call once per optimizer step, after the (last micro-batch's) backward and before clipping.

        `max_norm`: the clipping threshold the loop applies next; the row then records the clip factor
        min(1, max_norm / (total norm + 1e-6)) that clip_grad_norm_ will apply.
        `record`: record this step (True) or not (False) whatever `every` says (train-reference records on
        its evaluation steps, the last step among them).
        """
        if self._phase == "backward":
            raise LayerprobeError(
                f"after_backward() was called twice for step {self.step + 1}: call it once per optimizer "
                "step, after the last micro-batch's backward, then after_step() after optimizer.step()")
        self._phase = "backward"
        step = self.step + 1
        self._grad_sq, self._before, self._max_norm, self._reduced = None, None, max_norm, False
        if not (self.logs(step) if record is None else record):
            return
        self._grad_sq = self._gradient_squares()
        # The weights before the update, for ‖Δθ‖ after it: one buffer of the layers' weights, allocated on
        # the first logged step and refilled on the next ones (allocating a model's worth per step costs more).
        layers = [[_local(p).detach() for p in ps] for ps in self._layer_params]
        if self._buffer is None or any(len(b) != len(w) or any(x.shape != y.shape or x.dtype != y.dtype
                                                                 for x, y in zip(b, w))
                                       for b, w in zip(self._buffer, layers)):
            self._buffer = [[w.clone() for w in ws] for ws in layers]
        else:
            for b, w in zip(self._buffer, layers):
                torch._foreach_copy_(b, w)
        self._before = self._buffer

    def grad_norm(self) -> float:
        """The total L2 norm of this step's gradients before clipping (over every process's shards under
        FSDP2): call between after_backward() and clipping, e.g. to clip with it or to stop on a NaN.
        On a recorded step it is the total of the row's squares; on other steps it costs one pass over
        the gradients (and one all-reduce of a scalar under FSDP2)."""
        if self._phase != "backward":
            raise LayerprobeError("grad_norm() was called before after_backward(): call it after "
                                  "monitor.after_backward() and before clipping")
        if self._grad_sq is None:
            squares = gradient_squares([_local(p.grad) for p in self._params if p.grad is not None])
            if not squares:
                return float("nan")
            total = torch.tensor([math.fsum(squares)], dtype=torch.float64)
            return math.sqrt(self._all_reduce(total).item()) if self._sharded() else math.sqrt(total.item())
        if self._sharded() and not self._reduced:
            self._grad_sq, self._reduced = self._all_reduce(self._grad_sq), True
        squares = [sq for sq, seen in zip(self._grad_sq.tolist(), self._measured) if seen]
        return math.sqrt(math.fsum(squares)) if squares else float("nan")

    def after_step(self, loss: float | torch.Tensor | None = None, lr: float | None = None) -> dict | None:
        """Call once per optimizer step, after optimizer.step() (before or after zero_grad). Records the
        weight updates, runs the probe when due and writes the step's row (rank 0). Returns the row, or
        None on a step that records nothing."""
        if self._phase != "backward":
            raise LayerprobeError(
                f"after_step() was called for step {self.step + 1} before after_backward(): call "
                "monitor.after_backward() after loss.backward() and before clipping, then "
                "monitor.after_step() after optimizer.step()")
        self._phase = "step"
        self.step += 1
        step = self.step
        row: dict = {"step": step}
        if loss is not None:
            row["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if lr is not None:
            row["lr"] = float(lr)
        if self._grad_sq is not None:
            row.update(self._gradients_and_updates())
        if self.probes(step):
            row.update(self._probe_row())
        measured = self._grad_sq is not None or "probe_loss" in row
        self._grad_sq, self._before = None, None
        if not measured:
            return None  # loss and lr ride along on the steps that measure something
        self._write(row)
        return row

    # -- measurements --------------------------------------------------------------------------
    def _sharded(self) -> bool:
        return any(hasattr(p, "to_local") for _, _, ps in self._groups for p in ps[:1])

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over processes (a no-op in one process)."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.to(_collective_device())
        dist.all_reduce(t)
        return t.cpu()

    def _gradient_squares(self) -> torch.Tensor:
        """Squared gradient norm of every parameter, float64 (`metrics.gradient_squares`, one host copy); 0
        for a parameter without a gradient (`self._measured` says which had one)."""
        self._measured = [p.grad is not None for p in self._params]
        held = gradient_squares([_local(p.grad) for p in self._params if p.grad is not None])
        it = iter(held)
        return torch.tensor([next(it) if seen else 0.0 for seen in self._measured], dtype=torch.float64)

    def _gradients_and_updates(self) -> dict:
        L = self.anatomy.num_layers
        after = [[_local(p) for p in ps] for ps in self._layer_params]
        change, size = weight_change_sums(self._before, after, in_place=True)
        # One packed tensor: per-parameter gradient squares (unless grad_norm() already summed them), then
        # per-layer weight-change and weight squares: one all-reduce under FSDP2.
        n = 0 if self._reduced else len(self._params)
        packed = torch.cat([self._grad_sq[:n], change.cpu(), size.cpu()])
        if self._sharded():
            packed = self._all_reduce(packed)
        grad_sq = self._grad_sq.tolist() if self._reduced else packed[:n].tolist()
        change, size = packed[n:n + L].tolist(), packed[n + L:].tolist()
        return _gradient_row(self._groups, grad_sq, self._measured, L, self._max_norm) | {
            "layer_weight_update": [weight_update_ratio(c, s) for c, s in zip(change, size)]}

    def _probe_row(self) -> dict:
        stats = probe_statistics(self.anatomy, self.probe, self.tokens,
                                 forward_model=self.wrapper if self._sharded() else self.model)
        row = {"probe_loss": stats["loss"]}
        for name, values in stats["columns"].items():
            row[PROBE_KEYS.get(name, f"layer_{name}")] = values
        row["angular_matrix"] = stats["angular"]
        return row

    # -- output --------------------------------------------------------------------------------
    def log_scalars(self, **values: float) -> None:
        """A row of extra numbers (e.g. a loss logged apart) at the current step; compare merges rows of one step."""
        self._write({"step": self.step, **{k: float(v) for k, v in values.items()}}, last=False)

    def _write(self, row: dict, last: bool = True) -> None:
        if last:
            self.last = row
        if self.rank != 0:
            return
        if self._log is not None:
            self._log.write(row)
        for w in self._writers:
            w.write(row)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        for w in self._writers:
            w.close()
        self._writers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# Probe columns under the keys train-reference already logs (compare reads them), the rest as layer_<column>.
PROBE_KEYS = {"output_variance": "layer_output_var"}


def _gradient_row(groups, grad_sq: list[float], measured: list[bool], num_layers: int,
                  max_norm: float | None) -> dict:
    """Per-layer and per-kind gradient norms, the total and the clip factor from the parameters' squared
    norms, listed group after group (a parameter without a gradient is left out; a layer with none is NaN).
    Each norm is sqrt(fsum) of its parameters' squares: exactly rounded, in any order. A NaN stays NaN."""
    layer = [[] for _ in range(num_layers)]
    kind = {k: [[] for _ in range(num_layers)] for k in KINDS}
    total = []
    squares = iter(zip(grad_sq, measured))
    for index, k, params in groups:
        for sq, seen in (next(squares) for _ in params):
            if not seen:
                continue
            total.append(sq)
            if index is not None:
                layer[index].append(sq)
                if k in kind:
                    kind[k][index].append(sq)

    def norm(squares):
        return math.sqrt(math.fsum(squares)) if squares else float("nan")

    row = {"grad_norm": norm(total)}
    if max_norm is not None:
        row["clip_coef"] = clip_factor(row["grad_norm"], max_norm)
    row["layer_grad_norm"] = [norm(s) for s in layer]
    for k in KINDS:
        row[f"layer_grad_norm_{k}"] = [norm(s) for s in kind[k]]
    return row


def _vocab(model: nn.Module, anatomy: Anatomy) -> int | None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    weight = getattr(anatomy.embed, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _context(config) -> int | None:
    if config is None:
        return None
    from ..loading import context_length

    return context_length(config)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
