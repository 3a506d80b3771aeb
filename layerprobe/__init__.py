"""layerprobe: which layers of a language model actually contribute, and why."""

__version__ = "0.1.0"

from . import reference  # noqa: E402,F401  (registers our checkpoints with the transformers Auto classes)
from .analysis import analyze  # noqa: E402
from .errors import LayerprobeError  # noqa: E402
from .loading import load_model  # noqa: E402
from .results import AnalysisResult, load  # noqa: E402

__all__ = ["analyze", "load", "load_model", "AnalysisResult", "LayerprobeError", "__version__"]

from .comparison import Comparison, compare  # noqa: E402
__all__ += ["compare", "Comparison"]

from .pruning import SweepResult, prune_sweep, save_pruned  # noqa: E402
__all__ += ["prune_sweep", "save_pruned", "SweepResult"]

from .demo import demo  # noqa: E402
__all__ += ["demo"]
