"""Training the reference models: `train_reference` trains one model per norm scheme.

    from layerprobe.training import train_reference
    summary = train_reference(norm="pre,post,mix,lns", preset="tiny", steps=200, out="runs")
    summary = train_reference(norm="pre,lns", seeds=3, out="runs")  # runs/pre-seed0 … runs/lns-seed2

Modules, in the order a run uses them: settings (TrainSettings -> validated Plan, with --recipe and
--tokens resolved), recipes (the papers' settings as data), data (the data prepared once into a token
file by layerprobe.corpus, training blocks read by index, the held-out blocks, the BatchSource a step
reads), model, schedule (lr_at), layer_stats (held-out loss, per-layer variance, the clip; gradient
norms, clip factor and weight updates are layerprobe.monitor.LayerMonitor's),
checkpoint, signals, summary (RunResult, TrainingSummary), trainer (the loop).
"""

from .data import BatchSource, BlockBatches, load_token_data
from .schedule import lr_at
from .settings import Plan, TrainSettings
from .summary import RunResult, TrainingSummary
from ..corpus.vocab import train_bpe_tokenizer
from .trainer import train_reference

__all__ = ["BatchSource", "BlockBatches", "Plan", "load_token_data", "RunResult", "TrainSettings", "TrainingSummary", "lr_at",
           "train_bpe_tokenizer", "train_reference"]
