"""Report sections: markdown strings (printed by ``output: asis`` cells) and static figures (PNG).

Every function takes a :class:`actdiff.report.data.Run` and returns markdown or an
``IPython.display.Image`` (displayed by the cell, embedded in the HTML), or ``None`` when there is
nothing to draw (the caller prints a sentence instead).
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import re
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation

from .. import sysinfo
from ..compare.fitted import excluded_words
from .baseline import COSINE_FLOOR, MARGIN
from .data import IndexEntry, Run

FLOOR = 1e-12  # zeros are drawn at this floor on log axes
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>$~^@&:\"'=])")


# ----------------------------------------------------------------------------------------------- helpers
def esc(s) -> str:
    """Markdown-escape arbitrary text (prompt texts, node names) for an inline table cell."""
    s = "" if s is None else str(s)
    s = s.replace("\r", "␍").replace("\n", "⏎").replace("\t", "⇥")
    return _MD_SPECIAL.sub(r"\\\1", s)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return "–"
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        if x == 0:
            return "0"
        if 1e-3 <= abs(x) < 1e4:
            return f"{x:.{digits + 1}g}"
        return f"{x:.{digits - 1}e}"
    return esc(x)


def md_table(df: pd.DataFrame, formats: dict | None = None) -> str:
    """A pipe table; cells formatted with ``formats[col]`` (a callable) or :func:`fmt`."""
    formats = formats or {}
    if not len(df):
        return "*(no rows)*\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [formats.get(c, fmt)(v) for c, v in zip(cols, row, strict=False)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collapsed(summary: str, body: str) -> str:
    """A table folded under a one-line summary (an HTML <details> block; pandoc and quarto keep the markdown
    inside): the first screen shows the sentences and plots, a reviewer opens the tables on demand."""
    if not body.strip():
        return ""
    return f"\n<details><summary>{html.escape(summary)}</summary>\n\n{body}\n\n</details>\n"


def code(s) -> str:
    """Inline code (no markdown escaping inside; backticks in the text get a longer fence)."""
    if s is None or s == "":
        return "–"
    s = str(s).replace("\r", "␍").replace("\n", "⏎").replace("|", "¦")
    ticks = "``" if "`" in s else "`"
    return f"{ticks} {s} {ticks}" if ticks == "``" else f"`{s}`"


FIG_DPI = 90  # the report's PNGs


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure laid out at the resolution it is saved at, on the Agg canvas that saves it: its tight_layout and
    its save then share one renderer, and with it matplotlib's cache of text extents (keyed by renderer), so each
    tick label is measured once; a figure at the default 100 dpi laid out its text at 100 dpi and again at 90."""
    fig = Figure(figsize=figsize, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    return fig


def _image(fig: Figure):
    """A figure made by :func:`_figure` as an embedded PNG. A laid-out figure whose every artist lies inside it is
    saved as it is: one draw. One that reaches past its edges (tick labels tight_layout could not make room for) is
    saved cropped to what it draws (``bbox_inches="tight"``: a second layout pass and draw)."""
    from IPython.display import Image

    buf = io.BytesIO()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    inside = drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= w and drawn.y1 <= h
    fig.savefig(buf, format="png", dpi=FIG_DPI, **({} if inside else {"bbox_inches": "tight"}))
    return Image(data=buf.getvalue(), format="png")


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")
_MATHTEXT_TICK = re.compile(r"\$\\mathdefault\{(-?)(?:([0-9.]+)\\times)?(?:(\d+)\^\{(-?\d+)\}|([0-9.e+-]+))\}\$")


def _plain_tick(label: str) -> str:
    """A log axis' tick label as plain text ("10⁻⁶", "2×10⁻⁶") instead of the mathtext matplotlib writes
    ("$\\mathdefault{10^{-6}}$"): parsing mathtext cost a report ~0.5 CPU-s of its 3.4 s of figures, each
    report's kernel parsing the same labels afresh. A label of any other form is kept as it is."""
    m = _MATHTEXT_TICK.fullmatch(label)
    if not m:
        return label
    sign, coeff, base, exp, plain = m.groups()
    if plain is not None:
        return sign + plain
    return f"{sign}{coeff + '×' if coeff else ''}{base}{exp.translate(_SUPERSCRIPT)}"


class _PlainLogFormatter(LogFormatterSciNotation):
    def __call__(self, x, pos=None):
        return _plain_tick(super().__call__(x, pos))


def _scale(ax, axis: str, scale: str) -> None:
    """``ax.set_xscale``/``set_yscale`` to ``scale`` ("log", "symlog"): matplotlib's own ticks and its choice of
    which to label, the labels written as plain text (:func:`_plain_tick`)."""
    getattr(ax, f"set_{axis}scale")(scale)
    target = ax.xaxis if axis == "x" else ax.yaxis
    for get, put in ((target.get_major_formatter, target.set_major_formatter),
                     (target.get_minor_formatter, target.set_minor_formatter)):  # fmt: skip
        f = get()
        if type(f) is LogFormatterSciNotation:  # the scale's default, its settings kept
            put(_PlainLogFormatter(f._base, f.labelOnlyBase, f.minor_thresholds, f._linthresh))


def _floor(a) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), np.maximum(a, FLOOR), np.nan)


def _nodes(run: Run) -> pd.DataFrame:
    return run.summary["nodes"].sort_values("node_index").reset_index(drop=True)


def failing(run: Run) -> bool:
    return run.verdict.get("status") in ("fail", "deviates", "nonfinite")


# ----------------------------------------------------------------------------------------------- verdict
_CALLOUT = {"fail": "important", "nonfinite": "important", "deviates": "warning"}
_STATUS_WORDS = {
    "pass": "every node is within its error budget on every prompt",
    "fail": "{failing} node(s) exceed their local error budget",
    "deviates": "no node exceeds its local budget, but the outputs leave their propagated budgets",
    "nonfinite": "the engine produced NaN or Inf where the reference did not",
}


def _node_list(nodes: list[str], shown: int = 4) -> str:
    more = f" and {len(nodes) - shown} more" if len(nodes) > shown else ""
    return ", ".join(code(n) for n in nodes[:shown]) + more


def _cause_sentence(i: int, c: dict) -> str:
    effect = " It has no measurable effect on the outputs." if c.get("harmless") else ""
    if c["hypothesis"] == "unexplained":
        return f"Nothing tried explains {_node_list(c['nodes'])}.{effect}"
    return f"**Cause {i}:** {esc(c['says'])} It explains {_node_list(c['nodes'])}.{effect}"


def _embedding_effect(e: dict) -> str:
    if not e.get("prompts"):
        return ""
    if e.get("cosine_nonfinite"):
        n = e["cosine_nonfinite"]
        return f"The final embeddings are not finite on {n} prompt(s): their cosine is not measurable."
    worst = e.get("worst_cosine_prompts") or []
    out = (
        f"Effect on the final embeddings: cosine with the reference median {e.get('cosine_median', float('nan')):.6f}, "
        f"minimum {e.get('cosine_min', float('nan')):.6f}" + (f" ({code(worst[0])})" if worst else "")
    )
    if e.get("neighbour_overlap_mean") is not None:
        out += f"; top-10 neighbour overlap {e['neighbour_overlap_mean']:.2f} on a sample of {e.get('sample_size')}"
    return out + "."


def first_screen_md(run: Run) -> str:
    """The reviewer's first paragraph, in plain words: what was compared on how many prompts, pass or fail,
    each cause once with the nodes it explains, and the effect on the final embeddings."""
    v = run.verdict
    status = str(v.get("status", "?"))
    words = _STATUS_WORDS.get(status, "status {status}").format(failing=v.get("failing_nodes", 0), status=status)
    parts = [
        f"This report compares the side {code(run.side)} (variant {code(run.variant)}) with the PyTorch reference "
        f"of {code(run.model)} on {v.get('prompts', 0)} prompts. **{esc(status.upper())}**: {words}."
    ]
    if v.get("first_divergence"):
        parts.append(
            f"The first divergent node is {code(v['first_divergence'])} "
            f"({v.get('first_divergence_prompts', 0)} of {v.get('prompts', 0)} prompts)."
        )
    causes = v.get("causes") or []
    parts += [_cause_sentence(i, c) for i, c in enumerate(causes, start=1)]
    if failing(run) and not causes:
        parts.append("No explanation was found for the divergence.")
    if v.get("not_captured_nodes"):
        parts.append(f"{len(v['not_captured_nodes'])} node(s) were not captured by this side.")
    parts.append(reference_sentence(v.get("reference") or []))
    parts.append(_embedding_effect(run.embeddings_summary))
    return " ".join(p for p in parts if p) + "\n"


def _device_words(r: dict) -> str:
    name = f" ({esc(r['device_name'])})" if r.get("device_name") else ""
    return f"{code(r.get('device', 'cpu'))}{name}"


def reference_sentence(records: list[dict]) -> str:
    """Where the reference ran, for the first screen: nothing for the CPU in fp32 (the default; the provenance
    table lists it), a sentence for CUDA, and a bold warning when TF32 was allowed (its own matmul error is
    then ~1e-3, and the budgets of matmul-like nodes include it: actdiff.compare.budgets.U_REFERENCE)."""
    from ..compare.budgets import SAFETY, TF32_OPS, U_REFERENCE

    if not records or all(r.get("device", "cpu") == "cpu" and r.get("reference_precision") == "fp32" for r in records):
        return ""
    where = ", ".join(_device_words(r) for r in records)
    if any(r.get("reference_precision") == "tf32" for r in records):
        u = U_REFERENCE["tf32"]
        return (
            f"**The reference ran with TF32 allowed** (config `reference.allow_tf32: true`) on {where}: its "
            f"{', '.join(o.lower() for o in TF32_OPS)} nodes carry their own TF32 rounding (of order 1e-4 to 1e-3 "
            "relative), so their "
            f"budgets include 2^-10 for it ({SAFETY:.1f} × {u:.1e} = {SAFETY * u:.1e} at least), and an engine "
            "error below that there cannot be told from the reference's rounding."
        )
    mixed = " (its shards ran on different devices)" if len(records) > 1 else ""
    return f"The reference ran on {where} in true fp32 (TF32 off){mixed}."


def verdict_md(run: Run) -> str:
    """The verdict: status, what the replay proved, the outputs against their propagated budgets, and every
    cause in plain words with its numbers (catalogue entries, fitted or searched explanations, or what was
    tried when nothing reproduces the engine)."""
    v = run.verdict
    status = esc(str(v.get("status", "?")).upper())
    out = [
        f"::: {{.callout-{_CALLOUT.get(v.get('status'), 'note')}}}",
        f"## Verdict: {status}",
        "",
        first_screen_md(run),
    ]
    out += [
        "",
        f"- **Run:** {code(run.model)} / {code(run.side)} / {code(run.variant)}, {v.get('prompts', 0)} "
        f"inputs, {v.get('failing_nodes', 0)} failing node(s), {v.get('warned_nodes', 0)} warned node(s)",
    ]
    if v.get("excluded_prompts"):
        out.append(f"- **Excluded:** {esc(excluded_words(v['excluded_prompts']))}")
    if v.get("replay"):
        out.append(f"- **Replay:** {esc(v['replay']['statement'])}")
    for m in v.get("replay_mismatches") or []:
        out.append(
            f"- **Replay does not reproduce the dump** at {code(m['node'])} on {m['prompts']} input(s) (gap "
            f"{fmt(m['replay_gap_max'])}): the forward ran other code than the per-node replay"
        )
    if v.get("first_divergence"):
        out.append(
            f"- **First divergent node** (most common across inputs): {code(v['first_divergence'])} in "
            f"{v.get('first_divergence_prompts', 0)} of {v.get('prompts', 0)} inputs"
        )
    else:
        out.append("- **First divergent node:** none (no input has a failing node)")
    out += ["", ":::", "", _outputs_md(v), _causes_md(v)]
    ev = v.get("evidence") or []
    if ev:
        out.append(
            collapsed(
                f"Catalogue evidence at {v.get('first_divergence')} ({len(ev)} entries)",
                f"The op replayed under each catalogue entry, median relative error against the engine's output "
                f"(lower = reproduces the engine); the op as specified gives {fmt(v.get('baseline_error'))}.\n\n"
                + md_table(pd.DataFrame(ev)[["hypothesis", "error_median"]], {"hypothesis": code}),
            )
        )
    out.append(_search_md(run))
    fd = run.summary["first_divergence"]
    if len(fd):
        out.append(
            collapsed("First divergent node per input (histogram)", md_table(fd[["node", "prompts"]], {"node": code}))
        )
    return "\n".join(out) + "\n"


def _outputs_md(v: dict) -> str:
    o = v.get("outputs") or {}
    if not o.get("nodes"):
        return ""
    rows = pd.DataFrame(o["nodes"])[["node", "rel_l2_max", "propagated_budget_median", "prompts_over"]]
    head = (
        "**Outputs against their propagated budgets** (what an engine spending its whole local budget at every "
        "node would show; actdiff.compare.propagation)"
    )
    where = f" The propagated error first exceeds it at {code(o.get('grows_most'))}." if o.get("diverge") else ""
    return f"{head}:{where}\n\n" + md_table(rows, {"node": code}) + "\n"


def _causes_md(v: dict) -> str:
    """The numbers behind each cause of the first paragraph (its sentence is said there, once)."""
    causes = v.get("causes") or []
    if not causes:
        return ""
    out = ["**Causes**, with the nodes each explains in graph order:", ""]
    for i, c in enumerate(causes, start=1):
        nodes = _node_list(c["nodes"], 6)
        if c["hypothesis"] == "unexplained":
            t = c.get("tried") or {}
            out.append(
                f"- **Unexplained** at {nodes}: nothing tried reproduces the engine ({t.get('catalogue', 0)} catalogue "
                f"entries, {t.get('searched', 0)} searched candidates in {fmt(t.get('search_seconds'))} s"
                f"{', time budget spent' if t.get('search_timed_out') else ''}); best residual "
                f"{fmt(c.get('error_median'))} against {fmt(c.get('baseline_error_median'))} for the op as specified."
            )
        else:
            out.append(
                f"- **Cause {i}** ({c['kind']}: {code(c['hypothesis'])}) at {nodes}: reproduces the engine to "
                f"{fmt(c.get('error_median'))}, against {fmt(c.get('baseline_error_median'))} for the op as specified."
            )
    return "\n".join(out) + "\n"


def _search_md(run: Run) -> str:
    """The searched explanations, one row per distinct explanation (with the nodes it explains), folded. A
    sentence that is one of the verdict's causes is named by its number; a row the search could not explain
    names no candidate (its sentence would read as a cause) and keeps its best residual."""
    s = run.summary.get("search")
    if s is None or not len(s):
        return ""
    cause_no = {c.get("says"): i for i, c in enumerate(run.verdict.get("causes") or [], start=1) if c.get("says")}
    t = s.assign(
        found=[
            (f"cause {cause_no[w]}" if w in cause_no else w) if e else "nothing explains"
            for w, e in zip(s["says"], s["explains"], strict=True)
        ],
        kind=s["kind"].where(s["explains"], ""),
    )
    g = t.groupby(["found", "kind"], sort=False).agg(
        nodes=("node", lambda n: ", ".join(n)),
        error=("error", "max"),
        baseline_error=("baseline_error", "min"),
        tried=("tried", "sum"),
        seconds=("seconds", "sum"),
    )
    rows = g.reset_index()[["found", "kind", "nodes", "error", "baseline_error", "tried", "seconds"]]
    return collapsed(
        f"Searched explanations at {len(s)} node(s) the catalogue left unexplained ({len(rows)} distinct)",
        "Fits of the op's continuous parameters, structural alternatives, reduced precision at each step, "
        "parameters recovered from the data; `error` is the worst residual over the row's nodes.\n\n"
        + md_table(rows, {"found": esc, "nodes": esc}),
    )


# ------------------------------------------------------------------------------------------ before / after
def _causes_of(v: dict) -> set[str]:
    return {c["hypothesis"] for c in v.get("causes") or [] if c.get("hypothesis") != "unexplained"}


def _verdict_change_md(new: dict, old: dict) -> str:
    s_old, s_new = str(old.get("status", "?")).upper(), str(new.get("status", "?")).upper()
    out = [f"**Verdict:** {esc(s_old)} → **{esc(s_new)}**; failing nodes {old.get('failing_nodes', 0)} → "
           f"{new.get('failing_nodes', 0)}; first divergence {code(old.get('first_divergence') or '(none)')} → "
           f"{code(new.get('first_divergence') or '(none)')}."]  # fmt: skip
    gone, came = _causes_of(old) - _causes_of(new), _causes_of(new) - _causes_of(old)
    if gone:
        out.append("Causes no longer found: " + ", ".join(code(c) for c in sorted(gone)) + ".")
    if came:
        out.append("New causes: " + ", ".join(code(c) for c in sorted(came)) + ".")
    if not gone and not came and _causes_of(new):
        out.append("The same causes as before.")
    return " ".join(out)


def _embedding_change_md(run: Run, ba) -> str:
    e_new, e_old = run.embeddings_summary, ba.base.embeddings_summary
    counts = ba.prompts["change"].value_counts()
    return (
        f"**Final embeddings:** cosine median {e_old.get('cosine_median', float('nan')):.6f} → "
        f"{e_new.get('cosine_median', float('nan')):.6f}, minimum {e_old.get('cosine_min', float('nan')):.6f} → "
        f"{e_new.get('cosine_min', float('nan')):.6f}; of {len(ba.prompts)} prompts in both runs "
        f"{counts.get('worse', 0)} got worse and {counts.get('better', 0)} better (1 − cosine moved more than "
        f"{MARGIN}× and by more than {COSINE_FLOOR:g})."
    )


def _prompt_moves_md(ba) -> str:
    t = ba.prompts[ba.prompts["change"] != "same"].sort_values("delta_1_minus_cosine", ascending=False)
    if not len(t):
        return ""
    worse, better = t[t["change"] == "worse"].head(10), t[t["change"] == "better"].tail(10).iloc[::-1]
    return collapsed(
        f"Prompts that got worse ({int((t['change'] == 'worse').sum())}) or better "
        f"({int((t['change'] == 'better').sum())}), the largest moves",
        md_table(pd.concat([worse, better]), {"prompt_id": code, "change": esc}),
    )


def before_after_md(run: Run, baseline: str) -> str:
    """The run against the same run of ``baseline`` (actdiff.report.baseline), for the report's first screens."""
    from ..errors import ActdiffError
    from .baseline import before_after

    try:
        ba = before_after(run, baseline)
    except ActdiffError as e:
        return f"Against the baseline {code(baseline)}: not available ({esc(e)}).\n"
    out = [f"Against the baseline run in {code(baseline)}."]
    for d in ba.differs:
        out.append(f"\n::: {{.callout-warning}}\nNot comparable: {esc(d)}; its changes may not be the engine's.\n:::\n")
    out += ["", _verdict_change_md(run.verdict, ba.base.verdict), "", _embedding_change_md(run, ba), ""]
    n = ba.nodes
    changed = n[n["status_old"] != n["status_new"]]
    grew = n[n["local_rel_l2_p99_new"] > MARGIN * n["local_rel_l2_p99_old"].fillna(0).clip(lower=FLOOR)]
    out.append(
        f"**Nodes:** {len(changed)} changed status; the p99 local error grew more than {MARGIN}× at "
        f"{len(grew)} node(s)."
    )
    fm = {"node": code, "status_old": esc, "status_new": esc}
    out.append(collapsed(f"Per node, old vs new ({len(n)} nodes)", md_table(n, fm)))
    if len(ba.routing):
        out.append(collapsed("Routing agreement per MoE layer, old vs new", md_table(ba.routing)))
    out.append(_prompt_moves_md(ba))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ model graph
def graph_md(run: Run) -> str:
    """The model graph coloured by status (actdiff.report.graph_svg), from the node graph of the run's config."""
    from ..nodes import build_graph
    from .graph_svg import graph_html

    cfg = run.model_info.get("config")
    if not cfg:
        return "The model's config is not recorded (model.json), so the graph cannot be drawn.\n"
    return graph_html(build_graph(cfg, f"{run.model}/model.json"), _nodes(run), run.verdict) + "\n"


# ------------------------------------------------------------------------------------------- any prompt
def any_prompt_md(run: Run) -> str:
    """The whole corpus searchable, and any prompt's drill-down (actdiff.report.prompt_panel), from the summary
    ``prompt_table`` and the graph's key nodes."""
    from ..nodes import build_graph
    from .prompt_panel import panel_html

    cfg, table = run.model_info.get("config"), run.summary.get("prompt_table")
    if table is None or not cfg:
        return "This run has no prompt table (aggregated before it existed): rerun aggregation.\n"
    key_nodes = build_graph(cfg, f"{run.model}/model.json").key_nodes()
    if len(table) and len(table["key_rel_l2"].iloc[0]) != len(key_nodes):
        return "The prompt table was built for another graph than the model's: rerun aggregation.\n"
    intro = (
        f"All {len(table)} prompts of the corpus. Search by id or text; click a prompt (or open the page at "
        "`#prompt=ID`) for its error at each key node of the graph, its values next to the reference's where the "
        "run kept them (the worst inputs), and the routing of its tokens per MoE layer.\n\n"
    )
    return intro + panel_html(table, key_nodes, run.summary["drilldown"]) + "\n"


# ------------------------------------------------------------------------------------------ tokenization
TOKENIZERS = {"engine_eq_transformers": ("engine", "transformers"), "engine_eq_tokenizers": ("engine", "tokenizers"),
              "transformers_eq_tokenizers": ("transformers", "tokenizers")}  # fmt: skip


def _tokenization_setup(t: dict) -> str:
    """Which tokenization the reference used, what the engine is held to, max_length and versions."""
    target = t.get("engine_target") or "transformers"
    v = t.get("versions") if isinstance(t.get("versions"), dict) else {}
    versions = ", ".join(f"{k} {v[k]}" for k in ("transformers", "tokenizers") if k in v) or "versions not recorded"
    ml = t.get("max_length")
    source = t.get("max_length_source") or "the config"
    ml_text = f"max_length {ml} (from {source})" if ml else "max_length not recorded"
    return (
        f"The reference model ran on the ids of **{t.get('reference') or 'transformers'}** ({versions}); the engine's "
        f"own tokenizer is held to **{target}**; {ml_text}.\n"
    )


def _agreement_md(t: dict) -> str:
    agreement = t.get("agreement") or {}
    rows = [
        {"pair": f"{a} vs {b}", "equal": agreement[k]["equal"], "differ": agreement[k]["differ"],
         "not computed": agreement[k]["missing"]}
        for k, (a, b) in TOKENIZERS.items() if k in agreement
    ]  # fmt: skip
    return md_table(pd.DataFrame(rows)) if rows else ""


def _id_examples_md(examples: list, own: tuple[str, str], held_to: tuple[str, str]) -> str:
    """Differing prompts, ids around the first difference: ``own``/``held_to`` are (summary key, label)."""
    rows = []
    for r in examples:
        fd, ref, eng = r["first_diff"], r[held_to[0]], r[own[0]]
        lo = max(0, fd - 3)
        rows.append(
            {
                "prompt": r["prompt_id"],
                "text": str(r["text"])[:60],
                "first diff": fd,
                f"{held_to[1]} ids": " ".join(map(str, ref[lo : fd + 8])),
                f"{own[1]} ids": " ".join(map(str, eng[lo : fd + 8])),
                "lengths": f"{len(ref)} / {len(eng)}",
            }
        )
    return md_table(pd.DataFrame(rows), {"prompt": code})


def tokenization_md(run: Run, max_rows: int = 10) -> str:
    t = run.tokenization
    if not t or not t.get("inputs"):
        return "::: {.callout-warning}\nNo tokenization tables were found for this model.\n:::\n"
    target = t.get("engine_target") or "transformers"
    counts = {
        "inputs": t["inputs"],
        f"engine ids equal {target}'s": t["ids_match"],
        "ids differ": t["ids_differ"],
        "engine side missing": t["engine_missing"],
        "truncated (reference)": t["truncated"],
    }
    out = [_tokenization_setup(t), md_table(pd.DataFrame([counts]))]
    if t.get("agreement"):
        out.append("\n**Agreement of the three tokenizations** (prompts):\n\n" + _agreement_md(t))
    if not t["ids_differ"]:
        out.append(f"\nEvery input tokenizes identically on the engine and {target}: no failing prompts.\n")
    else:
        ex = t["examples"][:max_rows]
        out.append(
            f"\n**{t['ids_differ']} input(s) tokenize differently** (first {len(ex)} shown; ids around the "
            f"first difference, {target} and engine side by side):\n"
        )
        out.append(_id_examples_md(ex, ("engine_ids", "engine"), ("reference_ids", target)))
    lit = (t.get("examples_transformers_tokenizers") or [])[:max_rows]
    if lit:
        out.append(
            f"\n**transformers and tokenizers (tokenizer.json read literally) differ** on "
            f"{t['agreement']['transformers_eq_tokenizers']['differ']} input(s) (first {len(lit)} shown):\n"
        )
        out.append(_id_examples_md(lit, ("tokenizers_ids", "tokenizers"), ("transformers_ids", "transformers")))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- parity
def parity_md(run: Run, max_rows: int = 15) -> str:
    out = []
    w = run.summary.get("weights")
    if w is None:
        out.append("Weight parity is computed for the actdiff engine only; none for this side.\n")
    else:
        bad = w[(w["max_abs"] > 0) | (w["rel_l2"] > 0)]
        out.append(
            f"**Weights:** {len(w)} tensors as the engine uses them (after layout and quantisation) against "
            f"the checkpoint; {len(w) - len(bad)} identical, {len(bad)} differ "
            f"(largest relative L2 {fmt(float(w['rel_l2'].max()) if len(w) else 0.0)}).\n"
        )
        show = w.sort_values(["rel_l2", "max_abs"], ascending=False).head(max_rows)
        cols = [c for c in ["tensor", "source", "transform", "storage", "shape", "max_abs", "rel_l2"] if c in show]
        show = show[cols]
        out.append(f"Largest differences first ({len(show)} of {len(w)}):\n")
        out.append(md_table(show, {"tensor": code, "source": code}))
    cp = run.config_parity
    if cp:
        rows = [
            {
                "key": k,
                "config.json": json.dumps(v.get("config")),
                "engine": json.dumps(v.get("engine")),
                "match": bool(v.get("match")),
            }
            for k, v in cp.items()
            if isinstance(v, dict)
        ]
        nbad = sum(not r["match"] for r in rows)
        out.append(f"\n**Config:** {len(rows)} values, {nbad} mismatch(es).\n")
        out.append(md_table(pd.DataFrame(rows), {"key": code, "match": lambda m: "✔" if m else "**✘ mismatch**"}))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ node errors
def fig_node_error(run: Run):
    s = _nodes(run)
    x = np.arange(len(s))
    fig = _figure((11, 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (m, label) in zip(axes, [("rel_l2", "relative L2 (propagated)"), ("cosine", "1 − cosine")], strict=False):
        if m == "cosine":
            p10, p50, p90, mx = (1 - s["cosine_p90"], 1 - s["cosine_p50"], 1 - s["cosine_p10"], 1 - s["cosine_p10"])
            lo = 1 - s.get("cosine_min", s["cosine_p10"]) if "cosine_min" in s else p90
            mx = lo
        else:
            p10, p50, p90, mx = s[f"{m}_p10"], s[f"{m}_p50"], s[f"{m}_p90"], s[f"{m}_max"]
        ax.fill_between(x, _floor(p10), _floor(p90), alpha=0.3, color="tab:blue", label="p10–p90 across inputs")
        ax.plot(x, _floor(p50), color="tab:blue", lw=1.5, label="median")
        ax.plot(x, _floor(mx), "v" if m == "cosine" else "^", color="tab:red", ms=3, lw=0, label="worst input")
        if m == "rel_l2":
            ax.step(x, _floor(s["budget_median"]), where="mid", color="k", ls="--", lw=1, label="local budget")
            f = s["fail"] > 0
            if f.any():
                ax.plot(x[f], _floor(s.loc[f, "rel_l2_max"]), "x", color="darkred", ms=7, label="node fails")
        _scale(ax, "y", "log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7, loc="upper left", ncol=5)
    _node_ticks(axes[-1], s)
    fig.suptitle(f"Error by node in graph order (zeros drawn at {FLOOR:g})", fontsize=10)
    fig.tight_layout()
    return _image(fig)


def _node_ticks(ax, s: pd.DataFrame, max_labels: int = 60) -> None:
    step = max(1, math.ceil(len(s) / max_labels))
    idx = np.arange(0, len(s), step)
    ax.set_xticks(idx)
    ax.set_xticklabels([s["node"].iloc[i] for i in idx], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(s) - 0.5)


def fail_counts_md(run: Run, max_rows: int = 15) -> str:
    s = _nodes(run)
    bad = s[(s["fail"] > 0) | (s["warn"] > 0)]
    if not len(bad):
        return f"All {len(s)} nodes pass on every input (no `fail`, no `warn`).\n"
    n_fail, n_warn = int((s["fail"] > 0).sum()), int(((s["warn"] > 0) & (s["fail"] == 0)).sum())
    bad = pd.concat([bad[bad["fail"] > 0], bad[bad["fail"] == 0].sort_values("warn", ascending=False)]).head(max_rows)
    cols = [
        "node",
        "op",
        "layer",
        "fail",
        "warn",
        "budget_median",
        "local_rel_l2_max",
        "rel_l2_p50",
        "rel_l2_max",
        "cosine_p10",
    ]
    return f"{n_fail} of {len(s)} nodes fail and {n_warn} more only warn on at least one input.\n" + collapsed(
        f"Failing nodes, then the most frequent warnings ({len(bad)} rows)",
        "`fail` = local error over budget or new NaN/Inf, `warn` = inherited error > 10× budget.\n\n"
        + md_table(bad[[c for c in cols if c in bad]], {"node": code, "op": code}),
    )


def worst_prompts(run: Run, n: int = 20) -> list[str]:
    """The corpus's worst inputs, as aggregation ranked them (actdiff.compare.worst), worst first."""
    return run.summary["worst_prompts"].sort_values("rank")["prompt_id"].head(n).tolist()


def fig_heatmap(run: Run, worst_n: int = 20):
    d = run.summary["heatmap"]
    prompts = worst_prompts(run, worst_n)
    s = _nodes(run)
    piv = d[d["prompt_id"].isin(prompts)].pivot_table(
        index="prompt_id", columns="node_index", values="rel_l2", aggfunc="max"
    )
    piv = piv.reindex(index=prompts, columns=s["node_index"])
    z = np.log10(_floor(piv.to_numpy()))
    fig = _figure((11, 0.25 * len(prompts) + 2.2))
    ax = fig.subplots()
    im = ax.imshow(
        z,
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        vmin=math.log10(FLOOR),
        vmax=max(0.0, float(np.nanmax(z)) if np.isfinite(z).any() else 0.0),
    )
    ax.set_yticks(range(len(prompts)))
    ax.set_yticklabels(prompts, fontsize=7)
    _node_ticks(ax, s)
    fig.colorbar(im, ax=ax, label="log10 relative L2 (propagated)", fraction=0.025)
    ax.set_title(f"Relative L2 by node × input (worst {len(prompts)} inputs, worst first)", fontsize=10)
    fig.tight_layout()
    return _image(fig)


def has_token_errors(run: Run) -> bool:
    return len(run.summary["token_errors"]) > 0


def fig_token_error(run: Run, max_nodes: int = 4, max_prompts: int = 6):
    t = run.summary["token_errors"]
    if not len(t):
        return None
    order = _nodes(run)[["node", "node_index"]]
    present = set(t["node"].unique())  # once: a set rebuilt per node iterated the whole table per node
    nodes = [n for n in order["node"] if n in present][:max_nodes]
    fig = _figure((11, 2.6 * len(nodes)))
    axes = np.atleast_1d(fig.subplots(len(nodes), 1, squeeze=False)[:, 0])
    for ax, node in zip(axes, nodes, strict=False):
        g = t[t["node"] == node]
        top = g.groupby("prompt_id")["local_rel_l2"].max().sort_values(ascending=False).head(max_prompts).index
        for p in top:
            h = g[g["prompt_id"] == p].sort_values("token")
            ax.plot(h["token"], _floor(h["rel_l2"]), lw=1, label=f"{p} (propagated)")
            ax.plot(h["token"], _floor(h["local_rel_l2"]), lw=0.8, ls=":", color=ax.lines[-1].get_color())
        _scale(ax, "y", "log")
        ax.set_title(f"{node}: error by token position (solid propagated, dotted local)", fontsize=9)
        ax.set_ylabel("relative L2")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=3)
    axes[-1].set_xlabel("token position")
    fig.tight_layout()
    return _image(fig)


def fig_amplification(run: Run):
    s = _nodes(run)
    x = np.arange(len(s))
    fig = _figure((11, 5.5))
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    ax.plot(x, _floor(s["local_rel_l2_p50"]), color="tab:green", lw=1.3, label="local (op on reference inputs), median")
    ax.plot(x, _floor(s["local_rel_l2_max"]), "^", color="tab:green", ms=3, label="local, worst input")
    ax.plot(x, _floor(s["rel_l2_p50"]), color="tab:blue", lw=1.3, label="propagated, median")
    ax.step(x, _floor(s["budget_median"]), where="mid", color="k", ls="--", lw=1, label="local budget")
    _scale(ax, "y", "log")
    ax.set_ylabel("relative L2")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(alpha=0.3)
    ax2.bar(x, _floor(s["amplification_p50"]), color="tab:purple", width=0.8, label="amplification, median")
    ax2.plot(x, _floor(s["amplification_max"]), "_", color="k", ms=6, label="amplification, max")
    ax2.axhline(1, color="grey", lw=0.8)
    _scale(ax2, "y", "log")
    ax2.set_ylabel("propagated / local")
    ax2.legend(fontsize=7, loc="upper left")
    ax2.grid(alpha=0.3)
    _node_ticks(ax2, s)
    fig.suptitle(
        "Local vs propagated error per node (amplification = inherited error carried by the node)", fontsize=10
    )
    fig.tight_layout()
    return _image(fig)


# ------------------------------------------------------------------------------------------------- MoE
def has_routing(run: Run) -> bool:
    return len(run.summary["routing"]) > 0


def routing_md(run: Run) -> str:
    r = run.summary["routing"]
    cols = [
        "layer",
        "tokens",
        "agreement",
        "jaccard_mean",
        "flips",
        "flips_explained",
        "near_ties",
        "moe_out_rel_l2_median",
        "forced_rel_l2_median",
    ]
    return md_table(r[[c for c in cols if c in r]])


def fig_routing(run: Run):
    r = run.summary["routing"].sort_values("layer")
    n = len(r)
    fig = _figure((11, 3.0 + 2.4 * n))
    gs = fig.add_gridspec(1 + n, 2)
    ax = fig.add_subplot(gs[0, :])
    ax.bar(r["layer"].astype(str), r["agreement"], color="tab:blue")
    for i, (a, f) in enumerate(zip(r["agreement"], r["flips"], strict=False)):
        ax.text(i, a, f"{a:.4f}\n{f} flips", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(min(0.9, float(r["agreement"].min()) - 0.02), 1.02)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert-set agreement")
    ax.set_title("Routing agreement per MoE layer", fontsize=9)
    for i, row in enumerate(r.itertuples()):
        edges = np.asarray(json.loads(row.margin_edges)) if hasattr(row, "margin_edges") else None
        h, hf = np.asarray(json.loads(row.margin_hist)), np.asarray(json.loads(row.margin_hist_flips))
        axh = fig.add_subplot(gs[1 + i, 0])
        centers = np.sqrt(np.maximum(edges[:-1], 1e-7) * edges[1:]) if edges is not None else np.arange(len(h))
        widths = np.diff(edges) if edges is not None else 1
        axh.bar(centers, h, width=widths * 0.9, color="tab:grey", label="all tokens")
        axh.bar(centers, hf, width=widths * 0.9, color="tab:red", label="flips")
        _scale(axh, "x", "log")
        _scale(axh, "y", "symlog")
        axh.set_title(f"layer {row.layer}: reference router margin", fontsize=8)
        axh.legend(fontsize=6)
        axl = fig.add_subplot(gs[1 + i, 1])
        ref, eng = np.asarray(json.loads(row.ref_load)), np.asarray(json.loads(row.eng_load))
        e = np.arange(len(ref))
        axl.bar(e - 0.2, ref, width=0.4, label="reference")
        axl.bar(e + 0.2, eng, width=0.4, label="engine")
        axl.set_title(f"layer {row.layer}: expert load", fontsize=8)
        axl.set_xticks(e)
        axl.legend(fontsize=6)
    fig.tight_layout()
    return _image(fig)


# ------------------------------------------------------------------------------------------ embeddings
def embeddings_md(run: Run) -> str:
    e = run.embeddings_summary
    rows = [
        ("inputs", e.get("prompts")),
        ("cosine, minimum", e.get("cosine_min")),
        ("cosine, 1st percentile", e.get("cosine_p01")),
        ("cosine, median", e.get("cosine_median")),
        ("sample size (neighbour metrics)", e.get("sample_size")),
        ("top-10 neighbour overlap, mean", e.get("neighbour_overlap_mean")),
        ("top-10 neighbour overlap, min", e.get("neighbour_overlap_min")),
        ("similarity rank correlation (Spearman)", e.get("similarity_spearman")),
    ]
    df = pd.DataFrame(rows, columns=["metric", "value"])
    fm = {"value": lambda v: f"{v:.10f}" if isinstance(v, float) and 0.99 < v <= 1 else fmt(v, 4)}
    out = md_table(df, fm)
    if e.get("worst_cosine_prompts"):
        out += "\nLowest-cosine inputs: " + ", ".join(code(p) for p in e["worst_cosine_prompts"]) + "\n"
    return out


def fig_embeddings(run: Run):
    """Histogram of 1 - cosine of the final embeddings over every input (counted by aggregation)."""
    from ..compare.aggregate import COSINE_EDGES

    hist = np.asarray(run.embeddings_summary.get("cosine_hist") or [], np.float64)
    if not hist.size or not hist.sum():
        return None
    edges = np.maximum(COSINE_EDGES, FLOOR)
    fig = _figure((8, 3))
    ax = fig.subplots()
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="tab:blue")
    _scale(ax, "x", "log")
    ax.set_xlabel(f"1 − cosine of the final embeddings (reference vs engine; zeros at {FLOOR:g})")
    ax.set_ylabel("inputs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _image(fig)


# --------------------------------------------------------------------------------------- worst inputs
def worst_inputs_md(run: Run, n: int = 5) -> str:
    w = run.summary["worst_prompts"].sort_values("rank").head(n)
    rows = [
        {
            "input": r.prompt_id,
            "text": str(r.text)[:50],
            "tokens": int(r.tokens),
            "failing nodes": int(r.failing_nodes),
            "first divergence": r.first_divergence or "(none)",
            "worst node": r.worst_node,
            "local / budget": float(r.local_over_budget),
            "final cosine": float(r.embedding_cosine),
        }
        for r in w.itertuples()
    ]
    out = [
        md_table(
            pd.DataFrame(rows),
            {
                "input": code,
                "first divergence": code,
                "worst node": code,
                "final cosine": lambda v: f"{v:.10f}" if v == v else "–",
            },
        )
    ]
    dd = run.summary["drilldown"]
    out.append(
        "\n### Drill-down\n\nFirst values of each key node, reference vs engine, with their difference "
        "(the corpus's worst inputs, as ranked above).\n"
    )
    drilled = set(dd["prompt_id"].unique())
    shown = [p for p in w["prompt_id"] if p in drilled]
    for p in shown[:n]:
        out.append(_drill_md(p, dd[dd["prompt_id"] == p].sort_values("node_index")))
    return "\n".join(out)


def _drill_md(prompt: str, g: pd.DataFrame) -> str:
    rows = []
    for r in g.itertuples():
        ref, eng = np.asarray(r.ref_first, np.float64), np.asarray(r.eng_first, np.float64)
        k = min(len(ref), len(eng), 4)
        rows.append(
            {
                "node": r.node,
                "rel L2": r.rel_l2,
                "reference": " ".join(f"{v:+.5f}" for v in ref[:k]),
                "engine": " ".join(f"{v:+.5f}" for v in eng[:k]),
                "delta": " ".join(f"{v:+.1e}" for v in (eng[:k] - ref[:k])),
            }
        )
    table = md_table(pd.DataFrame(rows), {"node": code, "reference": code, "engine": code, "delta": code})
    return f"\n#### {esc(prompt)}\n\n{table}"


# ------------------------------------------------------------------------------------------- provenance
def _cpu_flags(flags: dict) -> str:
    return ", ".join(f"{f} {'✔' if ok else '✘'}" for f, ok in flags.items()) if flags else "unavailable"


REPORT_LIBRARIES = ("actdiff", "numpy", "pandas", "pyarrow", "torch", "matplotlib", "jupytext", "ipython")


def imported_rows(records: list[dict]) -> list[tuple[str, str]]:
    """Provenance of an imported engine (its config entry, mapping file, source folder or command, alignment)."""
    if not records:
        return []
    r, spec = records[0], records[0].get("engine_spec", {})
    a = r.get("alignment", {})
    n_matched, n_missing = len(a.get("matched", {})), len(r.get("missing_nodes", []))
    sha = f" (sha256 {r['mapping_sha256'][:16]})" if r.get("mapping_sha256") else ""
    says = f": {r['engine']}" if r.get("engine") else ""  # the mapping file's own engine description
    rows = [
        ("engine", f"{spec.get('name', '?')} (kind {spec.get('kind', 'import')})" + says),
        ("mapping file", f"{r.get('mapping') or 'none: tensors named by canonical node'}{sha}"),
    ]
    if spec.get("command"):
        rows.append(("engine command", spec["command"]))
    rows.append(("source", "; ".join(x.get("source_dir", "?") for x in records) if spec.get("source") or not
                 spec.get("command") else "a scratch folder per shard, deleted after the import"))  # fmt: skip
    rows.append(("alignment", f"{n_matched} canonical nodes matched, {n_missing} missing (NaN), "
                              f"{len(a.get('unused_external', []))} engine tensors unused"))  # fmt: skip
    return rows


def reference_rows(records: list[dict]) -> list[tuple[str, str]]:
    """The reference's device, its versions and torch numerics as its dump recorded them (one set per device)."""
    rows = []
    for r in records:
        versions = ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("cuda_capability", "cuda_runtime", "cuda_driver",
                                                                        "cudnn_version") if r.get(k))  # fmt: skip
        rows.append(("reference device", f"{r.get('device', 'cpu')} ({r.get('device_name', 'unrecorded')})"
                                         + (f"; {versions}" if versions else "")))  # fmt: skip
        numerics = r.get("torch_numerics") or {}
        settings = ", ".join(f"{k} {v if v != '' else 'unset'}" for k, v in sorted(numerics.items()))
        settings = settings or "not recorded (an older dump)"
        rows.append(("reference precision", f"{r.get('reference_precision', 'fp32')}; torch: {settings}"))
    return rows


def provenance_md(run: Run) -> str:
    """Where the numbers come from (actdiff.sysinfo collects it for dumps, reports and benchmarks alike)."""
    m, rt = run.model_info, sysinfo.runtime()
    rows = [
        ("model", m.get("name", run.model)),
        ("architecture", m.get("arch")),
        ("model directory", m.get("dir")),
        ("weights sha256", m.get("weights_sha256")),
        ("side / variant", f"{run.side} / {run.variant}"),
        *imported_rows(run.imported),
        *reference_rows(run.verdict.get("reference") or []),
        ("results", str(run.run_dir)),
        ("git commit", sysinfo.git_commit()),
        ("python", rt["python"]),
        ("libraries", ", ".join(f"{p} {v}" for p, v in sysinfo.library_versions(REPORT_LIBRARIES).items())),
        ("CPU flags", _cpu_flags(rt["cpu_flags"])),
        ("machine", rt["machine"]),
        ("date", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
    ]
    return md_table(pd.DataFrame(rows, columns=["item", "value"]), {"value": code})


# ----------------------------------------------------------------------------------------------- index
def report_href(e: IndexEntry) -> str:
    return f"{quote(e.model, safe='')}/{quote(e.side, safe='')}/{quote(e.variant, safe='')}.html"


def _trend(e: IndexEntry, old: IndexEntry | None) -> str:
    """The run against the baseline's same run: status and minimum embedding cosine before -> now."""
    if old is None:
        return ""
    if not old.verdict:
        return "<br>before: not in the baseline"
    c_old, c_new = old.verdict.get("embedding_cosine_min"), e.verdict.get("embedding_cosine_min")
    cos = f", cosine min {c_old:.6f} → {c_new:.6f}" if c_old is not None and c_new is not None else ""
    return f"<br>before: {esc(str(old.verdict.get('status', '?')).upper())}{cos}"


def _index_cell(e: IndexEntry, old: IndexEntry | None = None) -> str:
    st = str(e.verdict.get("status", "?")).upper()
    badge = f"[{st}]{{.badge-{st.lower()}}}"
    fd = e.verdict.get("first_divergence")
    extra = f"<br>first divergence: {code(fd)}" if fd else "<br>no divergence"
    causes = [c["hypothesis"] for c in e.verdict.get("causes", [])]
    if not causes and e.verdict.get("hypothesis"):
        causes = [e.verdict["hypothesis"]]
    if causes:
        extra += "<br>causes: " + ", ".join(code(c) for c in causes)
    return f"[{badge} report]({report_href(e)}){extra}{_trend(e, old)}"


def _one_minus(c) -> str:
    """1 - cosine in scientific notation (a cosine of 0.99999999999996 reads as 1 at any sane width)."""
    return "–" if c is None or pd.isna(c) else f"{max(1.0 - float(c), 0.0):.1e}"


def index_embeddings_md(entries: list[IndexEntry]) -> str:
    """One table per model: a row per (engine, variant), the final embeddings against the reference's (every
    input's cosine: worst, 1st percentile, median as 1 - cosine; on the neighbour sample: top-10 neighbour
    overlap and the rank correlation of the similarity matrices), so every engine's variants compare at a glance."""
    if not entries:
        return "No runs.\n"
    head = (
        "| engine | variant | verdict | inputs | 1 − cosine, worst | 1 − cosine, p1 | 1 − cosine, median "
        "| top-10 neighbour overlap, mean (min) | similarity rank correlation | sample |"
    )
    lines = []
    for m in dict.fromkeys(e.model for e in entries):
        lines += [f"### {esc(m)}", "", head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for e in sorted((e for e in entries if e.model == m), key=lambda e: e.side):
            x = e.embeddings
            ov = x.get("neighbour_overlap_mean")
            ov_s = f"{ov:.3f} ({x.get('neighbour_overlap_min', float('nan')):.2f})" if ov is not None else "–"
            rho = x.get("similarity_spearman")
            lines.append(
                f"| {esc(e.side)} | {code(e.variant)} | {esc(str(e.verdict.get('status', '?')).upper())} "
                f"| {x.get('prompts', '–')} | {_one_minus(x.get('cosine_min'))} | {_one_minus(x.get('cosine_p01'))} "
                f"| {_one_minus(x.get('cosine_median'))} | {ov_s} | {'–' if rho is None else f'{rho:.6f}'} "
                f"| {x.get('sample_size', '–')} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def index_md(entries: list[IndexEntry], baseline: list[IndexEntry] | None = None) -> str:
    """One table per model: a row per variant, a column per engine (side), so the engines (ours, llama.cpp,
    ONNX Runtime, an imported one) are side by side at every variant; with the ``baseline`` runs' entries,
    each cell says what it was before."""
    if not entries:
        return "No runs.\n"
    by = {(e.model, e.side, e.variant): e for e in entries}
    old = {(e.model, e.side, e.variant): e for e in baseline} if baseline is not None else {}
    lines = []
    for m in dict.fromkeys(e.model for e in entries):
        sides = list(dict.fromkeys(e.side for e in entries if e.model == m))
        variants = list(dict.fromkeys(e.variant for e in entries if e.model == m))
        lines += [f"### {esc(m)}", ""]
        lines += ["| variant | " + " | ".join(esc(s) for s in sides) + " |", "|---|" + "---|" * len(sides)]
        for v in variants:
            cells = [_index_cell(by[(m, s, v)], old.get((m, s, v))) if (m, s, v) in by else "–" for s in sides]
            lines.append(f"| {code(v)} | " + " | ".join(cells) + " |")
        lines.append("")
    out = "\n".join(lines) + "\n\n"
    out += "\n".join(
        f"- [{esc(e.model)} / {esc(e.side)} / {esc(e.variant)}]({report_href(e)}): {esc(e.verdict.get('plain'))}"
        for e in entries
    )
    return out + "\n"
