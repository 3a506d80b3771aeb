"""One look for every figure: sizes, fonts, and one colour per norm scheme (colour-blind safe)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import re  # noqa: E402

from matplotlib.ticker import Formatter, LogFormatterMathtext, MaxNLocator  # noqa: E402

from ..io import atomic_path  # noqa: E402

# Model, run and folder names are the user's and reach titles, legends and tick labels: show every string
# literally. With mathtext on, a name like `m$x$` draws as maths and one like `a$\b$` aborts the figure.
# Our own labels use Unicode (ℓ, √, ⁿ) instead of $...$. Set here, at import, so the figures of every report
# module (they all import this one) get it, also those not made by `new_figure`.
LITERAL_TEXT = {"text.parse_math": False}
plt.rcParams.update(LITERAL_TEXT)

# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
SCHEME_COLORS = {
    "pre": "#0072B2",
    "post": "#D55E00",
    "mix": "#009E73",
    "lns": "#CC79A7",
    "deepnorm": "#E69F00",
    "sandwich": "#56B4E9",
    # Okabe-Ito has no colour left that reads on white (its yellow does not, its black stays spare for unknown
    # schemes): these three come from Paul Tol's muted palette, also colour-blind safe.
    "dyt": "#332288",
    "hybrid": "#882255",
    "hybrid_star": "#999933",
    "unknown": "#555555",
}
METRIC_COLORS = {
    "angular_distance": "#0072B2",
    "block_influence": "#D55E00",
    "output_variance": "#009E73",
    "update_variance": "#CC79A7",
    "grad_norm": "#000000",
    "grad_norm_attention": "#0072B2",
    "grad_norm_mlp": "#D55E00",
    "grad_norm_norm": "#009E73",
}
LAYER_AXIS = "layer ℓ (0-based)"


def scheme_color(scheme: str | None, fallback_index: int = 0) -> str:
    if scheme and scheme.lower() in SCHEME_COLORS:
        return SCHEME_COLORS[scheme.lower()]
    return OKABE_ITO[fallback_index % len(OKABE_ITO)]


def new_figure(width: float = 7.5, height: float = 4.2):
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False, **LITERAL_TEXT})
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax


_SUPERSCRIPT = str.maketrans("-−0123456789", "⁻⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def plain_tick_label(label: str) -> str:
    """A tick label matplotlib wrote as mathtext ('$\\mathdefault{10^{-2}}$', log axes) in Unicode ('10⁻²'):
    with maths parsing off (LITERAL_TEXT) the markup would be drawn as it is."""
    if not (len(label) > 1 and label.startswith("$") and label.endswith("$")):
        return label
    text = label[1:-1].replace("\\mathdefault", "").replace("\\times", "×").replace("\\,", "").replace("\\;", " ")
    text = re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(_SUPERSCRIPT), text)
    return text.replace("{", "").replace("}", "").replace("\\", "")


class _PlainTicks(Formatter):
    """Wraps a log axis's formatter, which writes mathtext, so its labels come out as plain Unicode."""

    def __init__(self, inner: Formatter):
        self.inner = inner

    def set_axis(self, axis):
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def set_locs(self, locs):
        self.inner.set_locs(locs)

    def __call__(self, x, pos=None):
        return plain_tick_label(self.inner(x, pos))


def _plain_ticks(fig) -> None:
    for ax in fig.axes:  # colour bars too
        for axis in (ax.xaxis, ax.yaxis):
            for get, put in ((axis.get_major_formatter, axis.set_major_formatter),
                             (axis.get_minor_formatter, axis.set_minor_formatter)):
                if isinstance(get(), LogFormatterMathtext):  # log and symlog axes; never a user's labels
                    put(_PlainTicks(get()))


def save_figure(fig, path, tight: bool = True) -> None:
    """Write a PNG atomically and release the figure. `tight=False` for figures laid out by
    matplotlib's constrained layout (panel grids with a shared colour bar)."""
    _plain_ticks(fig)
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def integer_ticks(ax, n_layers: int) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n_layers, 16)))


# Several models with the same norm scheme share its colour; line style and marker tell them apart.
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DEPTH_AXIS = "normalised depth ℓ/(L−1) (0 = first layer, 1 = last)"


def model_styles(models: list[tuple[str, str]]) -> dict[str, dict]:
    """(label, scheme) pairs -> matplotlib style per label: the scheme's colour, then a line style and
    marker per model within that scheme. Unknown schemes get the palette's colours no scheme uses."""
    spare = [c for c in OKABE_ITO if c not in SCHEME_COLORS.values() and c != "#F0E442"] + ["#555555", "#999999"]
    unknown: dict[str, str] = {}
    used: dict[str, int] = {}
    out = {}
    for label, scheme in models:
        key = (scheme or "unknown").lower()
        if key in SCHEME_COLORS and key != "unknown":
            color = SCHEME_COLORS[key]
        else:
            if key not in unknown:
                unknown[key] = spare[len(unknown) % len(spare)]
            color = unknown[key]
        i = used.get(color, 0)
        used[color] = i + 1
        out[label] = {"color": color, "linestyle": LINESTYLES[i % len(LINESTYLES)],
                      "marker": MARKERS[i % len(MARKERS)]}
    return out
