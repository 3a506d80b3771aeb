"""`LayerMonitorLightning`: the monitor in a Lightning `Trainer`, as a `Callback` (Lightning is an optional
extra: `pip install lightning`).

    trainer = lightning.Trainer(callbacks=[LayerMonitorLightning(probe=probe_ids, probe_every=50)], ...)

Lightning calls `on_before_optimizer_step` once the gradients are accumulated and before it clips them:
the monitor's `after_backward` (with `gradient_clip_val` as the clip threshold when clipping by norm).
The optimizer steps inside the training step of the last micro-batch, so that batch's
`on_train_batch_end` is the monitor's `after_step`. The monitor is attached to the transformers model the
LightningModule holds as a child (one with a `config`), else to the LightningModule itself, with
`layers_path` relative to it.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from .core import LayerMonitor


class LayerMonitorLightning(Callback):
    """`out` defaults to the trainer's log folder (`trainer.log_dir`, else `default_root_dir`); the other
    arguments are `LayerMonitor`'s."""

    def __init__(self, out=None, *, every: int = 1, probe=None, probe_every: int | None = None,
                 layers_path: str | None = None, tokens: str = "last", tensorboard: bool = False,
                 wandb: bool = False):
        self.out = out
        self.options = dict(every=every, probe=probe, probe_every=probe_every, layers_path=layers_path,
                            tokens=tokens, tensorboard=tensorboard, wandb=wandb)
        self.monitor: LayerMonitor | None = None
        self._pending = False

    def on_fit_start(self, trainer, pl_module):
        out = self.out or trainer.log_dir or trainer.default_root_dir
        # A LightningModule usually holds the transformers model as a child: monitor that (its config gives
        # the vocabulary and the head gives the logit lens); else the LightningModule itself.
        target = next((m for m in pl_module.children() if hasattr(m, "config")), pl_module)
        self.monitor = LayerMonitor(target, out=out, step=trainer.global_step, **self.options)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        clip = trainer.gradient_clip_val
        by_norm = clip and (trainer.gradient_clip_algorithm in (None, "norm"))
        self.monitor.after_backward(max_norm=float(clip) if by_norm else None)
        self._pending = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._pending:
            return  # a micro-batch of an accumulation: the optimizer has not stepped
        self._pending = False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.after_step(loss=loss)

    def on_fit_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()
