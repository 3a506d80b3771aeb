"""layerprobe: which layers of a language model actually contribute, and why."""

__version__ = "0.1.0"
