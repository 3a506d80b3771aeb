"""`LayerMonitorCallback`: the monitor in a Hugging Face `Trainer`, as a `TrainerCallback`.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[LayerMonitorCallback(probe=probe_ids, probe_every=50)])

The Trainer clips gradients before it calls any callback (`on_pre_optimizer_step` sees them clipped), so the
callback takes the clipping over: at `on_train_begin` it sets `args.max_grad_norm` to 0 and keeps the
value; at `on_pre_optimizer_step` it measures the unclipped gradients, then clips with
`torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)`, the call the Trainer's accelerator
makes for a single process or DDP, so training is unchanged; `on_train_end` puts the value back. The
Trainer's own logged `grad_norm` stays the unclipped total. fp16 (a gradient scaler: the gradients are
scaled at that point), DeepSpeed and FSDP (their own clipping) are refused: use `LayerMonitor` in a loop.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..errors import LayerprobeError
from .core import LayerMonitor


class LayerMonitorCallback(TrainerCallback):
    """The monitor's two calls at the Trainer's optimizer step. `out` defaults to `args.output_dir`, `every`
    to `args.logging_steps`; the other arguments are `LayerMonitor`'s."""

    def __init__(self, out=None, *, every: int | None = None, probe=None, probe_every: int | None = None,
                 layers_path: str | None = None, tokens: str = "last", tensorboard: bool = False,
                 wandb: bool = False):
        self.options = dict(probe=probe, probe_every=probe_every, layers_path=layers_path, tokens=tokens,
                            tensorboard=tensorboard, wandb=wandb)
        self.out, self.every = out, every
        self.monitor: LayerMonitor | None = None
        self.max_norm: float | None = None
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            raise LayerprobeError("LayerMonitorCallback cannot read unscaled gradients under fp16 (a gradient "
                                  "scaler); train in bf16 or float32, or call LayerMonitor from your own loop")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise LayerprobeError("LayerMonitorCallback does not support DeepSpeed or FSDP in the Trainer (they clip "
                                  "gradients their own way); call LayerMonitor from your own loop")
        every = self.every or (int(args.logging_steps) if args.logging_steps >= 1 else 1)
        self.monitor = LayerMonitor(model, out=self.out or args.output_dir, every=every, step=state.global_step,
                                    **self.options)
        self._model = model
        self.max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        args.max_grad_norm = 0.0  # measured unclipped first, clipped here after (see the module docstring)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.after_backward(max_norm=self.max_norm)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.max_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None)
        self.monitor.after_step(lr=groups[0]["lr"] if groups else None)  # the rate this step used

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs and "loss" in logs:
            self.monitor.log_scalars(loss=logs["loss"])  # the Trainer's mean loss since its last log

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self.max_norm if self.max_norm is not None else args.max_grad_norm
        if self.monitor is not None:
            self.monitor.close()
