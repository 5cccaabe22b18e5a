"""The index page's embedding table: every (engine, variant)'s final-embedding metrics side by side, from
summaries fabricated here (no pipeline run: the CI config has no ONNX Runtime runs)."""

from __future__ import annotations

import html
import importlib
import json
import re
from pathlib import Path

import pytest

from actdiff.layout import Layout
from actdiff.report import render_index
from actdiff.report.data import load_index
from actdiff.report.sections import index_embeddings_md

render_mod = importlib.import_module("actdiff.report.render")


def _emb(prompts, cos_min, cos_p01, cos_median, overlap_mean, overlap_min, spearman) -> dict:
    """An embedding summary as compare.aggregate writes it (every prompt in the sample)."""
    return dict(prompts=prompts, cosine_min=cos_min, cosine_p01=cos_p01, cosine_median=cos_median,
                sample_size=prompts, neighbour_overlap_mean=overlap_mean, neighbour_overlap_min=overlap_min,
                similarity_spearman=spearman)  # fmt: skip


# (side, variant) -> (status, embedding summary)
RUNS = {
    ("actdiff", "fp32"): ("pass", _emb(47, 1 - 3e-13, 1 - 2e-13, 1 - 4e-14, 1.0, 1.0, 1.0)),
    ("llamacpp", "fp32"): ("fail", _emb(47, 0.9712, 0.9754, 0.9931, 0.951, 0.8, 0.998765)),
    ("onnxruntime", "int8-static"): ("deviates", _emb(43, 0.99854, 0.9987, 0.9995, 0.986, 0.9, 0.999812)),
    ("onnxruntime", "fp32"): ("pass", {}),  # no embedding summary (a run without one): dashes, not a crash
}
MODEL = "tiny-nomic-moe"


@pytest.fixture
def results(tmp_path) -> Path:
    L = Layout(str(tmp_path))
    for (side, variant), (status, emb) in RUNS.items():
        v = Path(L.verdict(MODEL, side, variant))
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text(json.dumps({"status": status, "plain": f"{status.upper()}: {side} {variant}", "causes": []}))
        if emb:
            Path(L.summary_json(MODEL, side, variant, "embeddings")).write_text(json.dumps(emb))
    return tmp_path


def _runs() -> list[str]:
    return [f"{MODEL}/{s}/{v}" for s, v in RUNS]


def test_index_embedding_rows_per_engine_and_variant(results):
    md = index_embeddings_md(load_index(results, _runs()))
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in md.splitlines()[4:] if line}
    assert set(rows) == {(s, f"`{v}`") for s, v in RUNS}, md
    # 1 - cosine in scientific notation: worst, p1, median; overlap mean (min); Spearman; sample size
    int8_static = rows[("onnxruntime", "`int8-static`")]
    assert "| DEVIATES | 43 | 1.5e-03 | 1.3e-03 | 5.0e-04 | 0.986 (0.90) | 0.999812 | 43 |" in int8_static
    assert "| PASS | 47 | 3.0e-13 | 2.0e-13 | 4.0e-14 | 1.000 (1.00) | 1.000000 | 47 |" in rows[("actdiff", "`fp32`")]
    assert "| FAIL | 47 | 2.9e-02 | 2.5e-02 | 6.9e-03 | 0.951 (0.80) | 0.998765 | 47 |" in rows[("llamacpp", "`fp32`")]
    assert "| PASS | – | – | – | – | – | – | – |" in rows[("onnxruntime", "`fp32`")]


def test_index_page_shows_the_embedding_table(results, tmp_path, monkeypatch):
    monkeypatch.setattr(render_mod, "find_quarto", lambda: None)  # the fallback renderer, as test_report does
    out = tmp_path / "index.html"
    render_index(str(results), _runs(), str(out))
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", out.read_text(encoding="utf-8"))).split())
    assert "Final embeddings" in text and "top-10 neighbour overlap, mean (min)" in text, text[:2000]
    assert "onnxruntime int8-static DEVIATES 43 1.5e-03 1.3e-03 5.0e-04 0.986 (0.90) 0.999812 43" in text, text


def test_graph_colours_a_pass_node_without_a_local_error():
    """A node judged on its propagated error only (its inputs fused away by the side: local error NaN) is drawn
    as a pass, not an error (an ONNX Runtime run at level all rendered no report before)."""
    from actdiff.report.graph_svg import PASS_SHADES, node_colour

    shades = [c for _, c in PASS_SHADES]
    assert node_colour("pass", {"budget_median": 1e-6, "local_rel_l2_max": float("nan")}) == shades[0]
    assert node_colour("pass", {"budget_median": 1e-6, "local_rel_l2_max": 5e-7}) in shades
    assert node_colour("pass", {"budget_median": 1e-6, "local_rel_l2_max": float("inf")}) == shades[0]
