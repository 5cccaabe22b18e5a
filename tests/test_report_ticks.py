"""The report figures' log-axis tick labels: matplotlib's ticks and its choice of which to label, written as plain
text instead of mathtext (actdiff.report.sections._scale), so a report's kernel does not parse mathtext."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from actdiff.report.sections import _plain_tick, _scale


@pytest.mark.parametrize(
    ("mathtext", "plain"),
    [
        (r"$\mathdefault{10^{-6}}$", "10⁻⁶"),
        (r"$\mathdefault{10^{0}}$", "10⁰"),
        (r"$\mathdefault{-10^{3}}$", "-10³"),
        (r"$\mathdefault{2\times10^{-6}}$", "2×10⁻⁶"),
        (r"$\mathdefault{2.5\times10^{12}}$", "2.5×10¹²"),
        (r"$\mathdefault{0}$", "0"),
        (r"$\mathdefault{1e-06}$", "1e-06"),
        ("", ""),
        (r"$\mathdefault{2.718^{3}}$", r"$\mathdefault{2.718^{3}}$"),  # another form: kept as matplotlib wrote it
    ],
)
def test_plain_tick(mathtext, plain):
    assert _plain_tick(mathtext) == plain


def _labels(scale: str, lo: float, hi: float, plain: bool) -> list[tuple[float, str]]:
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = np.geomspace(lo, hi, 50) if lo > 0 else np.linspace(lo, hi, 50)
    ax.plot(np.arange(50), y)
    if plain:
        _scale(ax, "y", scale)
    else:
        ax.set_yscale(scale)
    fig.canvas.draw()
    ticks = [*ax.yaxis.get_major_ticks(), *ax.yaxis.get_minor_ticks()]
    return sorted((round(float(t.get_loc()), 15), t.label1.get_text()) for t in ticks if t.label1.get_visible())


@pytest.mark.parametrize(
    ("scale", "lo", "hi"),
    [("log", 1e-9, 1e-2), ("log", 1.8e-4, 2.5e-4), ("log", 3e-1, 4e2), ("symlog", -1e3, 1e5)],
)
def test_log_axes_label_the_same_ticks_in_plain_text(scale, lo, hi):
    """The same ticks carry a label as with matplotlib's own formatter (minor ticks on a short range included),
    each the same number, and none is mathtext."""
    plain, math = _labels(scale, lo, hi, True), _labels(scale, lo, hi, False)
    assert [loc for loc, _ in plain] == [loc for loc, _ in math]
    assert [bool(s) for _, s in plain] == [bool(s) for _, s in math]
    assert all("$" not in s for _, s in plain)
    assert [_plain_tick(s) for _, s in math] == [s for _, s in plain]
    assert any(s for _, s in plain)
