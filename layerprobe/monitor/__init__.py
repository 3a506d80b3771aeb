"""Per-layer depth health while a model trains: `LayerMonitor` for any training loop, and thin adapters
for the Hugging Face Trainer (`LayerMonitorCallback`, in `monitor.hf`) and Lightning (`monitor.lightning`).

    from layerprobe.monitor import LayerMonitor
"""

from .core import LOG_FILE, MANIFEST_FILE, LayerMonitor, unwrap_model

__all__ = ["LOG_FILE", "MANIFEST_FILE", "LayerMonitor", "LayerMonitorCallback", "unwrap_model"]


def __getattr__(name: str):
    if name == "LayerMonitorCallback":  # imports transformers: only when asked for
        from .hf import LayerMonitorCallback

        return LayerMonitorCallback
    raise AttributeError(name)
