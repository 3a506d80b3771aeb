"""Training the reference models: `train_reference` trains one model per norm scheme.

    from layerprobe.training import train_reference
    summary = train_reference(norm="pre,post,mix,lns", preset="tiny", steps=300, out="runs")
"""

from .tokenizer import train_bpe_tokenizer
from .trainer import RunResult, TrainingSummary, TrainSettings, lr_at, train_reference

__all__ = ["RunResult", "TrainSettings", "TrainingSummary", "lr_at", "train_bpe_tokenizer", "train_reference"]
