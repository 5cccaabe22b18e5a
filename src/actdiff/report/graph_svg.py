"""The model as a picture: a self-contained SVG of the canonical node graph (actdiff.nodes), laid out by
layer, each node coloured by its status and local error, the first divergent node and the named causes
marked; clicking a node shows its statistics (a few lines of inline script, no CDN, no network).

Built from the graph (node order, layers, inputs) and the run's per-node summary table; it never parses a
node's name. The picture is raw HTML printed by an ``output: asis`` cell: no blank line and no indented line
inside it, so pandoc passes it through as one raw block.
"""

from __future__ import annotations

import html
import json
import math
import os

import pandas as pd

from ..nodes import Graph

PER_LINE = 10  # nodes per line inside a layer's band
BOX_W, BOX_H, GAP_X, GAP_Y = 128, 26, 10, 14
BAND_LABEL_W, PAD = 86, 10
STATUS_COLOURS = {
    "fail": "#d7301f",
    "nonfinite": "#7b3294",
    "warn": "#fdae61",
    "not captured": "#d9d9d9",
}
PASS_SHADES = ((0.1, "#1a9850"), (0.5, "#91cf60"), (math.inf, "#d9ef8b"))  # local error / budget
STATS = {  # summary column -> label shown on click
    "op": "op",
    "fail": "inputs failing",
    "warn": "inputs warning",
    "budget_median": "local budget (median)",
    "local_rel_l2_max": "local rel L2 (max)",
    "rel_l2_p50": "propagated rel L2 (median)",
    "rel_l2_max": "propagated rel L2 (max)",
    "cosine_p10": "cosine (p10)",
}


def node_status(row) -> str:
    """One word per node, worst first (the same precedence as the verdict's counts)."""
    if row is None:
        return "not compared"
    for col, word in (("nonfinite", "nonfinite"), ("fail", "fail"), ("not_captured", "not captured"), ("warn", "warn")):
        if row.get(col, 0) and row[col] > 0:
            return word
    return "pass"


def node_colour(status: str, row) -> str:
    if status in STATUS_COLOURS:
        return STATUS_COLOURS[status]
    if status != "pass":
        return "#ffffff"
    budget, local = float(row.get("budget_median") or 0), float(row.get("local_rel_l2_max") or 0)
    # no local error measured (NaN: a node whose inputs the side fused away is judged on its propagated error
    # only): drawn as the plainest pass; a ratio past every limit takes the last shade
    ratio = local / budget if budget > 0 and math.isfinite(local) else 0.0
    return next((c for limit, c in PASS_SHADES if ratio < limit), PASS_SHADES[-1][1])


def bands(graph: Graph) -> list[tuple[str, list]]:
    """(label, nodes) per band: the nodes before the first layer, each layer, the nodes after the last."""
    out: list[tuple[str, list]] = []
    for node in graph:
        if node.layer is not None:
            label = f"layer {node.layer}"
        else:
            label = "output" if any(n.layer is not None for n in graph if n.index < node.index) else "input"
        if not out or out[-1][0] != label:
            out.append((label, []))
        out[-1][1].append(node)
    return out


def short_labels(nodes: list) -> dict[str, str]:
    """Each node's name without the prefix its band shares (cut at a separator), for the box text."""
    names = [n.name for n in nodes]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    cut = max(prefix.rfind("."), prefix.rfind("/")) + 1
    return {n: (n[cut:] or n) for n in names}


def positions(graph: Graph) -> tuple[dict[str, tuple[float, float]], list[tuple[str, float, float]], float]:
    """Top-left corner of every node's box, each band's label and top and height, and the total height."""
    pos: dict[str, tuple[float, float]] = {}
    labels = []
    y = PAD
    for label, nodes in bands(graph):
        lines = math.ceil(len(nodes) / PER_LINE)
        for i, n in enumerate(nodes):
            pos[n.name] = (BAND_LABEL_W + (i % PER_LINE) * (BOX_W + GAP_X), y + (i // PER_LINE) * (BOX_H + GAP_Y))
        height = lines * (BOX_H + GAP_Y) - GAP_Y
        labels.append((label, y, height))
        y += height + 2 * GAP_Y
    return pos, labels, y


def _edges(graph: Graph, pos: dict) -> list[str]:
    out = []
    for node in graph:
        x2, y2 = pos[node.name]
        for src in node.inputs:
            if src not in pos:  # the token ids: not a node of the picture
                continue
            x1, y1 = pos[src]
            out.append(
                f'<line x1="{x1 + BOX_W:.0f}" y1="{y1 + BOX_H / 2:.0f}" x2="{x2:.0f}" y2="{y2 + BOX_H / 2:.0f}" '
                'class="gedge"/>'
            )
    return out


def _stats_json(name: str, status: str, row, causes: list[str]) -> str:
    s = {"node": name, "status": status}
    if row is not None:
        for col, label in STATS.items():
            v = row.get(col)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                s[label] = v if isinstance(v, str) else float(v)
    if causes:
        s["explained by"] = "; ".join(causes)
    return html.escape(json.dumps(s), quote=True)


def _node_svg(node, xy, row, first: str | None, cause_of: dict[str, list[tuple[int, str]]], label: str) -> str:
    status = node_status(row)
    x, y = xy
    causes = cause_of.get(node.name, [])
    stroke = 'stroke="#000" stroke-width="3"' if node.name == first else 'stroke="#555" stroke-width="0.8"'
    dash = ' stroke-dasharray="4 2"' if status == "not captured" else ""
    parts = [
        f'<g class="gnode" data-node="{html.escape(node.name)}" data-status="{status}" '
        f'data-stats="{_stats_json(node.name, status, row, [c for _, c in causes])}" tabindex="0">',
        f"<title>{html.escape(node.name)} ({html.escape(node.op)}): {status}</title>",
        f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{node_colour(status, row)}" '
        f"{stroke}{dash}/>",
        f'<text x="{x + 5:.0f}" y="{y + 16:.0f}">{html.escape(label[:21])}</text>',
    ]
    for k, (number, _) in enumerate(causes):
        cx = x + BOX_W - 8 - 16 * k
        parts.append(f'<circle cx="{cx:.0f}" cy="{y:.0f}" r="7" class="gcause"/>')
        parts.append(f'<text x="{cx:.0f}" y="{y + 3:.0f}" class="gcause-n">{number}</text>')
    parts.append("</g>")
    return "".join(parts)


def causes_by_node(verdict: dict) -> dict[str, list[tuple[int, str]]]:
    """node -> [(cause number, the cause's hypothesis)] as the report's first paragraph numbers them."""
    out: dict[str, list[tuple[int, str]]] = {}
    for i, c in enumerate(verdict.get("causes") or [], start=1):
        if c.get("hypothesis") == "unexplained":
            continue
        for n in c.get("nodes", []):
            out.setdefault(n, []).append((i, str(c["hypothesis"])))
    return out


def graph_svg(graph: Graph, nodes: pd.DataFrame, verdict: dict) -> str:
    """The SVG of ``graph`` coloured from the summary table ``nodes`` (one row per node)."""
    rows = {r["node"]: r for r in nodes.to_dict("records")}
    pos, band_labels, height = positions(graph)
    width = BAND_LABEL_W + PER_LINE * (BOX_W + GAP_X) + PAD
    first, cause_of = verdict.get("first_divergence"), causes_by_node(verdict)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="actdiff-graph" viewBox="0 0 {width} {height:.0f}" '
        f'width="100%" role="img" aria-label="model graph coloured by status">',
        "<style>.gedge{stroke:#888;stroke-opacity:.35;stroke-width:1}.gnode{cursor:pointer}"
        ".gnode text{font:10px sans-serif;fill:#111}.gcause{fill:#08306b}"
        ".gcause-n{font:bold 9px sans-serif;fill:#fff;text-anchor:middle}.gband{font:bold 11px sans-serif;fill:#333}"
        ".gnode.sel rect{stroke:#08519c;stroke-width:3}</style>",
    ]
    out += _edges(graph, pos)
    for label, y, h in band_labels:
        out.append(f'<text x="4" y="{y + min(h, BOX_H) / 2 + 4:.0f}" class="gband">{html.escape(label)}</text>')
    for _, band in bands(graph):
        short = short_labels(band)
        out += [_node_svg(n, pos[n.name], rows.get(n.name), first, cause_of, short[n.name]) for n in band]
    out.append("</svg>")
    return "\n".join(out)


LEGEND = (
    "fill: red = fails (local error over budget), orange = warns (inherited error only), purple = NaN/Inf, grey "
    "dashed = not captured, greens = passes (darker = further inside its budget); black outline = first divergent "
    "node; numbered dots = the causes of the verdict. Click a node for its statistics."
)

CLICK_SCRIPT = (
    "<script>(function(){var info=document.getElementById('actdiff-graph-info');"
    "document.querySelectorAll('.actdiff-graph .gnode').forEach(function(g){"
    "function show(){document.querySelectorAll('.actdiff-graph .gnode.sel').forEach(function(e){"
    "e.classList.remove('sel')});g.classList.add('sel');var s=JSON.parse(g.getAttribute('data-stats'));"
    "var rows=Object.keys(s).map(function(k){var v=s[k];if(typeof v==='number'){v=Math.abs(v)>=1e-3||v===0?"
    "+v.toPrecision(4):v.toExponential(2)}return '<tr><th>'+k+'</th><td>'+String(v).replace(/</g,'&lt;')"
    "+'</td></tr>'});info.innerHTML='<table>'+rows.join('')+'</table>'}"
    "g.addEventListener('click',show);g.addEventListener('keydown',function(e){if(e.key==='Enter')show()})})"
    "})();</script>"
)


def graph_html(graph: Graph, nodes: pd.DataFrame, verdict: dict) -> str:
    """The SVG, its legend, the panel a click fills, and the script: one raw HTML block (no blank lines)."""
    return "\n".join(
        [
            '<div class="actdiff-graph-wrap">',
            graph_svg(graph, nodes, verdict),
            f'<p class="actdiff-graph-legend">{html.escape(LEGEND)}</p>',
            '<div id="actdiff-graph-info" class="actdiff-graph-info">Click a node.</div>',
            CLICK_SCRIPT,
            "</div>",
        ]
    )
