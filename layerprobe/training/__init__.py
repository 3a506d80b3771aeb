"""Training the reference models: `train_reference` trains one model per norm scheme.

    from layerprobe.training import train_reference
    summary = train_reference(norm="pre,post,mix,lns", preset="tiny", steps=300, out="runs")

Modules, in the order a run uses them: settings (TrainSettings -> validated Plan), data (token blocks and
the BatchSource a step reads), model, schedule (lr_at), layer_stats (held-out loss, per-layer variance and
gradient norms), checkpoint, signals, summary (RunResult, TrainingSummary), trainer (the loop).
"""

from .data import BatchSource, BlockBatches
from .schedule import lr_at
from .settings import Plan, TrainSettings
from .summary import RunResult, TrainingSummary
from .tokenizer import train_bpe_tokenizer
from .trainer import train_reference

__all__ = ["BatchSource", "BlockBatches", "Plan", "RunResult", "TrainSettings", "TrainingSummary", "lr_at",
           "train_bpe_tokenizer", "train_reference"]
