"""The report's figures (actdiff.report.sections._figure, _image): laid out and saved at one resolution, saved as
laid out when everything drawn lies inside the figure, cropped to what is drawn when something reaches past an
edge, so no label is cut off."""

from __future__ import annotations

import io

from PIL import Image as PILImage

from actdiff.report.sections import FIG_DPI, _figure, _image


def _png_size(fig) -> tuple[int, int]:
    return PILImage.open(io.BytesIO(_image(fig).data)).size


def test_laid_out_figure_is_saved_at_its_size():
    fig = _figure((6, 3))
    ax = fig.subplots()
    ax.plot([0, 1], [1, 2])
    ax.set_xticks([0, 1], ["a long tick label", "another"], rotation=90)
    fig.tight_layout()
    assert fig.dpi == FIG_DPI
    assert _png_size(fig) == (6 * FIG_DPI, 3 * FIG_DPI)


def test_label_past_the_edge_is_kept_by_cropping_to_what_is_drawn():
    fig = _figure((6, 3))
    ax = fig.subplots()
    ax.plot([0, 1], [1, 2])
    ax.text(1.4, 0.5, "a note far right of the axes", transform=ax.transAxes)  # past the figure's right edge
    w, h = _png_size(fig)
    assert w > 6 * FIG_DPI  # the canvas grew to hold the text instead of cutting it off
