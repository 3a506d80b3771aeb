"""The monitor's probe: analyze's hooked forward on a fixed batch (or several), in the middle of someone's training.

The statistics come from `LayerCapture.per_layer()` and `angular_mean()`, the same code that fills
analyze's layers.csv and angular.csv, so a probe at step s and `analyze` of the step-s checkpoint on the
same batch agree; train-reference's held-out statistics are these forwards too (`probe_sums`, summed over
processes before the ratios: training/layer_stats.py). The run must not notice: the forward is under
no_grad (no graph, `.grad` untouched), every module is put in eval mode and back into the mode it was in,
and the CPU and CUDA random states are restored, so the next training step draws the same dropout masks
as it would have without a probe.
"""

from __future__ import annotations

import contextlib

import torch

from ..anatomy import Anatomy
from ..capture import LayerCapture
from ..errors import LayerprobeError
from ..metrics import next_token_loss_sum, predicted_tokens
from ..opening import eval_mode


def check_probe(probe, vocab_size: int | None, context: int | None) -> torch.Tensor:
    """The probe batch as a [batch, tokens] int64 tensor of ids the model can read, or a clear error."""
    try:
        ids = torch.as_tensor(probe)
    except (TypeError, ValueError, RuntimeError) as e:
        raise LayerprobeError(f"probe must be a [batch, tokens] tensor of token ids ({e})") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise LayerprobeError(f"probe must hold integer token ids, not {str(ids.dtype).replace('torch.', '')}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise LayerprobeError(f"probe must be a [batch, tokens] tensor with at least 1 sample of 2 tokens; "
                              f"got shape {list(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise LayerprobeError(f"probe holds token ids from {low} to {high}, outside this model's vocabulary "
                              f"of {vocab_size} (0 to {vocab_size - 1 if vocab_size else '?'})")
    if context is not None and ids.shape[1] > context:
        raise LayerprobeError(f"probe has {ids.shape[1]} tokens per sample, beyond this model's context of {context}")
    return ids.to(torch.long)


@contextlib.contextmanager
def untouched(model: torch.nn.Module):
    """Eval mode and no_grad inside; each module's own training flag and the random states restored after."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with eval_mode(model), torch.no_grad():
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def model_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers causal LM (keyword call, no cache) or of a module that takes ids and
    returns logits (or an output with `.logits`, or a tuple whose first element is the logits)."""
    if hasattr(model, "config"):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor):
        raise LayerprobeError(f"the model returned {type(out).__name__}, not logits; the probe needs a causal LM")
    return logits


def probe_statistics(anatomy: Anatomy, ids, tokens: str = "last",
                     forward_model: torch.nn.Module | None = None, *, batch_size: int | None = None,
                     metrics=None) -> dict:
    """Per-layer statistics of hooked forwards over `ids`: capture's columns (one list each), the
    (L+1)×(L+1) mean angular-distance matrix (when angular distance is among `metrics`), and the mean
    next-token loss over every predicted token.

    `ids`: one [batch, tokens] tensor, or a sequence of them; one `LayerCapture` accumulates over all of
    them, so several batches give the statistics of their union, as `analyze` over the same batches does.
    `batch_size`: split each tensor into forwards of at most this many samples (None: one forward each).
    `metrics`: the statistics to take (`LayerCapture`'s selection; None: every one).
    `forward_model`: the module to call when it is not `anatomy.model` itself (a wrapper sharing its layers).
    """
    capture, loss_sum, predicted = probe_sums(anatomy, ids, tokens, forward_model, batch_size=batch_size,
                                              metrics=metrics)
    out = {"columns": capture.per_layer(), "loss": float(loss_sum) / predicted}
    if "angular" in capture.metrics:
        out["angular"] = capture.angular_mean().tolist()
    return out


def probe_sums(anatomy: Anatomy, ids, tokens: str = "last", forward_model: torch.nn.Module | None = None, *,
               batch_size: int | None = None, metrics=None, token_variance: bool = False,
               autocast_dtype: torch.dtype | None = None) -> tuple[LayerCapture, torch.Tensor, int]:
    """The forwards of `probe_statistics` before any ratio: (the capture, holding its running sums; the
    next-token loss sum, float64; the predicted tokens), for a caller that adds them over processes first
    (`LayerCapture.all_reduce`: train-reference's held-out statistics).

    `token_variance`: the capture also sums each token's variance over hidden units (its "token_variance"
    column). `autocast_dtype`: each forward (not the loss) under torch.autocast to that dtype, on the
    inputs' device, as the training step runs.
    """
    model = forward_model if forward_model is not None else anatomy.model
    capture = LayerCapture(anatomy, tokens=tokens, detect_placement=False, metrics=metrics,
                           token_variance=token_variance)
    loss_sum, predicted = torch.zeros((), dtype=torch.float64), 0
    with untouched(model), capture:
        for batch in _forwards(ids, batch_size):
            batch = batch.to(anatomy.input_device)
            with (torch.autocast(batch.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else contextlib.nullcontext()):
                logits = model_logits(model, batch)
            loss_sum = loss_sum + next_token_loss_sum(logits, batch).double().cpu()
            predicted += predicted_tokens(batch)
            capture.end_batch()
    return capture, loss_sum, predicted


def _forwards(ids, batch_size: int | None):
    """The [b, tokens] batches to run: each tensor of `ids` (one tensor or several) in `batch_size` pieces."""
    for t in [ids] if isinstance(ids, torch.Tensor) else ids:
        yield from (t,) if batch_size is None else t.split(batch_size)
