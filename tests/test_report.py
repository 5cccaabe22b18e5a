"""HTML reports (actdiff.report): fallback rendering for real, the quarto path with a stand-in executable,
parameters, failing cells, and the fault report opened in headless Chromium.

The reports are rendered straight from the package (the rules render_report/render_index call the same
functions). They read the pipeline's results of config/ci.yaml: an existing complete results/ci is reused
(keeps this module well under 3 minutes); otherwise the session fixture ``ci_run`` produces it.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from actdiff.report import RenderError, render, render_index, render_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO  # noqa: E402

render_mod = importlib.import_module("actdiff.report.render")

pytestmark = pytest.mark.e2e

MODEL, SIDE, FAULT = "tiny-nomic-moe", "actdiff", "fp32+fault=causal_mask"
RUNS = [f"{MODEL}/{SIDE}/fp32", f"{MODEL}/{SIDE}/{FAULT}", f"minilm-l6/{SIDE}/fp32"]
MAX_BYTES = 5 * 2**20
CHROMIUM = Path("/usr/bin/chromium")


def _complete(results: Path) -> bool:
    return all((results / r / "summary" / "verdict.json").is_file() for r in RUNS) and all(
        (results / r / "stats" / f"shard-{s}" / "nodes.parquet").is_file() for r in RUNS for s in (0, 1)
    )


@pytest.fixture(scope="module")
def results(request) -> Path:
    r = REPO / "results" / "ci"
    if not _complete(r):
        r = request.getfixturevalue("ci_run").results
    assert _complete(r), f"pipeline results under {r} are incomplete"
    return r


@pytest.fixture(scope="module", autouse=True)
def no_quarto(results):
    """The fallback renderer for real, even on a machine that has quarto."""
    mp = pytest.MonkeyPatch()
    mp.setattr(render_mod, "find_quarto", lambda: None)
    yield
    mp.undo()


def _text(path: Path) -> str:
    """Visible text of an HTML file, whitespace-normalised (pandoc wraps lines)."""
    h = path.read_text(encoding="utf-8")
    h = re.sub(r"<(script|style)\b.*?</\1>", " ", h, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", h)).split())


def _verdict(results: Path, run: str) -> dict:
    return json.loads((results / run / "summary" / "verdict.json").read_text())


@pytest.fixture(scope="module")
def rendered(results) -> dict[str, Path]:
    """The three reports and the index, rendered with the fallback into results/ci/test-reports/ (not the
    pipeline's reports/, whose index covers every run and which other tests read)."""
    out = results / "test-reports"
    paths = {}
    for r in RUNS:
        m, s, v = r.split("/")
        p = out / m / s / f"{v}.html"
        assert render_report(str(results), m, s, v, str(p)) == "fallback"
        paths[r] = p
    paths["index"] = out / "index.html"
    assert render_index(str(results), RUNS, str(paths["index"])) == "fallback"
    return paths


def _first_screen_holds_the_verdict(text: str, v: dict, run: str) -> None:
    """The reviewer's first paragraph: what was compared on how many prompts, the status, the first divergent
    node, and each cause's sentence exactly once in the whole page (the tables below name causes by number)."""
    text = re.sub(r"\(\s+", "(", re.sub(r"\s+([).,:;])", r"\1", text))  # tags stripped to spaces: "(x )" -> "(x)"
    head = f"This report compares the side {v['side']} (variant {v['variant']}) with the PyTorch reference of "
    head += v["model"]
    assert head in text and f"on {v['prompts']} prompts. {v['status'].upper()}" in text, run
    if v.get("first_divergence"):
        assert f"The first divergent node is {v['first_divergence']}" in text, run
    for i, c in enumerate(v.get("causes") or [], start=1):
        said = " ".join(c["says"].split())
        assert text.count(said) == 1, (run, said, text.count(said))
        assert f"Cause {i}: {said}" in text, run
    assert "Effect on the final embeddings: cosine with the reference median" in text, run


def test_reports_exist_small_and_hold_the_verdict(results, rendered):
    for r in RUNS:
        p = rendered[r]
        assert p.is_file() and 0 < p.stat().st_size < MAX_BYTES, p
        text = _text(p)
        v = _verdict(results, r)
        _first_screen_holds_the_verdict(text, v, r)
        for section in (
            "Tokenization parity",
            "Weight and config parity",
            "Error by node",
            "Embeddings",
            "Worst inputs",
            "Provenance",
        ):
            assert section in text, (section, p)
        h = p.read_text()
        assert 'src="data:image/png;base64,' in h  # figures embedded
        assert not re.search(r'(src|href)="https?://', h), "the report must not reference the network"
    fault = _verdict(results, f"{MODEL}/{SIDE}/{FAULT}")
    assert fault["status"] == "fail" and fault["hypothesis"] == "attention_causal_mask"
    text = _text(rendered[f"{MODEL}/{SIDE}/{FAULT}"])
    assert "Verdict: FAIL" in text and "attention_causal_mask" in text
    assert "Mixture of experts" in text and "Drill-down" in text
    assert "Verdict: PASS" in _text(rendered[f"{MODEL}/{SIDE}/fp32"])


@pytest.mark.parametrize("run", [f"{MODEL}/llamacpp/fp32", f"minilm-l6/{SIDE}/fp32"])
def test_model_graph_svg_marks_status_first_divergence_and_causes(results, run):
    """Issue 18: the SVG holds one box per node of the graph (both architectures), coloured from the node's
    status in the summary table, the first divergent node outlined, a numbered dot per cause on the nodes it
    explains, and nothing that reaches the network."""
    import xml.etree.ElementTree as ET

    from actdiff.nodes import build_graph
    from actdiff.report.data import load_run
    from actdiff.report.graph_svg import STATUS_COLOURS, graph_svg, node_status

    m, s, v = run.split("/")
    r = load_run(results, m, s, v)
    graph = build_graph(r.model_info["config"])
    nodes = r.summary["nodes"]
    svg = graph_svg(graph, nodes, r.verdict)
    assert "\n\n" not in svg and "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = {g.get("data-node"): g for g in ET.fromstring(svg).iterfind(".//s:g", ns)}
    assert list(groups) == graph.names()
    for row in nodes.to_dict("records"):
        g = groups[row["node"]]
        status = node_status(row)
        assert g.get("data-status") == status
        if status in STATUS_COLOURS:
            assert g.find("s:rect", ns).get("fill") == STATUS_COLOURS[status], row["node"]
    first = r.verdict.get("first_divergence")
    outlined = [n for n, g in groups.items() if g.find("s:rect", ns).get("stroke-width") == "3"]
    assert outlined == ([first] if first else [])
    explained = {n for c in r.verdict.get("causes") or [] if c["hypothesis"] != "unexplained" for n in c["nodes"]}
    dotted = {n for n, g in groups.items() if g.find("s:circle", ns) is not None}
    assert dotted == explained and (explained or r.verdict["status"] == "pass")


def test_index_links_every_report(results, rendered):
    idx = rendered["index"]
    assert idx.is_file() and idx.stat().st_size < MAX_BYTES
    h = idx.read_text()
    hrefs = re.findall(r'href="([^"#]+\.html)"', h)
    assert "tiny-nomic-moe/actdiff/fp32%2Bfault%3Dcausal_mask.html" in hrefs
    from urllib.parse import unquote

    for r in RUNS:
        m, s, v = r.split("/")
        assert any(unquote(x) == f"{m}/{s}/{v}.html" for x in hrefs), r
    for x in hrefs:
        assert (idx.parent / unquote(x)).is_file(), x
    text = _text(idx)
    assert "FAIL" in text and "PASS" in text and "encoder.layers.0.attn.context" in text


def test_parameter_change_changes_the_output(results, rendered):
    a, b = rendered[f"{MODEL}/{SIDE}/fp32"], rendered[f"{MODEL}/{SIDE}/{FAULT}"]
    ta, tb = _text(a), _text(b)
    assert ta != tb
    assert FAULT in tb and FAULT not in ta


def test_failing_cell_fails_the_render(tmp_path, caplog):
    qmd = tmp_path / "bad.qmd"
    qmd.write_text(
        textwrap.dedent("""\
        ---
        title: bad
        ---

        ```{python}
        #| tags: [parameters]
        x = 1
        ```

        ```{python}
        raise ValueError(f"boom-{x}-cell")
        ```
        """)
    )
    out = tmp_path / "bad.html"
    with pytest.raises(RenderError, match=r"boom-7-cell"):
        render(qmd, out, {"x": 7}, logging.getLogger("test"))
    assert not out.exists(), "a failing cell must not leave a report behind"


def test_the_collector_is_off_while_the_fallback_renders_and_as_it_was_after(tmp_path, monkeypatch):
    """render._collector_paused: the cells run with Python's cyclic collector off (a report's imports and figures
    set off hundreds of collections), and the render leaves it as it found it: on when it was on, off when the
    caller had it off, on again after a failing cell."""
    import gc

    renderer = sys.modules["actdiff.report.render"]  # the module (the package's ``render`` is the function)
    monkeypatch.setattr(renderer, "find_quarto", lambda: None)  # the fallback, also where quarto exists
    qmd = tmp_path / "gc.qmd"
    qmd.write_text(
        textwrap.dedent("""\
        ---
        title: gc
        ---

        ```{python}
        #| tags: [parameters]
        fail = False
        ```

        ```{python}
        #| output: asis
        import gc
        print(f"collector-on-{gc.isenabled()}")
        if fail:
            raise ValueError("cell failed on purpose")
        ```
        """)
    )
    assert gc.isenabled()
    render(qmd, tmp_path / "on.html", {"fail": False})
    assert "collector-on-False" in (tmp_path / "on.html").read_text() and gc.isenabled()
    with pytest.raises(RenderError, match="on purpose"):
        render(qmd, tmp_path / "failed.html", {"fail": True})
    assert gc.isenabled()
    gc.disable()
    try:
        render(qmd, tmp_path / "off.html", {"fail": False})
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_quarto_path_with_stand_in(results, tmp_path, monkeypatch, caplog):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    args_log = tmp_path / "args.json"
    fake = bindir / "quarto"
    fake.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        a = sys.argv[1:]
        json.dump({{"args": a, "cwd": os.getcwd()}}, open({str(args_log)!r}, "w"))
        assert a[0] == "render" and a[1].endswith(".qmd") and os.path.isfile(a[1]), a
        params = dict(a[i + 1].split(":", 1) for i in range(len(a)) if a[i] == "-P")
        assert params["model"] == "tiny-nomic-moe" and params["variant"] == "fp32+fault=causal_mask", params
        assert params["side"] == "actdiff" and os.path.isdir(params["results"]), params
        i = a.index("--to"); assert a[i + 1] == "html", a
        i = a.index("-M"); assert a[i + 1] == "embed-resources:true", a
        out = os.path.splitext(a[1])[0] + ".html"
        open(out, "w").write("<html><body>STAND-IN QUARTO " + params["variant"] + "</body></html>")
        sys.exit(0)
        """)
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(render_mod, "find_quarto", lambda: shutil.which("quarto"))  # the real PATH lookup
    out = tmp_path / "q" / "report.html"
    with caplog.at_level(logging.INFO):
        kind = render_report(str(results), MODEL, SIDE, FAULT, str(out))
    assert kind == "quarto"
    assert "renderer: quarto" in caplog.text
    assert out.read_text() == "<html><body>STAND-IN QUARTO fp32+fault=causal_mask</body></html>"
    rec = json.loads(args_log.read_text())
    assert Path(rec["cwd"]) != REPO and "actdiff-render-" in rec["cwd"], "quarto must run in a temporary directory"
    assert not Path(rec["cwd"]).exists(), "the temporary directory is removed after the render"


def test_quarto_failure_is_an_error(results, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "quarto"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('ERROR: cell failed', file=sys.stderr)\nsys.exit(1)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(render_mod, "find_quarto", lambda: str(fake))
    out = tmp_path / "r.html"
    with pytest.raises(RenderError, match="cell failed"):
        render_report(str(results), MODEL, SIDE, "fp32", str(out))
    assert not out.exists()


def test_fault_report_in_headless_chromium(results, rendered):
    assert CHROMIUM.is_file(), "Debian chromium is required: apt-get install -y chromium"
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    page_path = rendered[f"{MODEL}/{SIDE}/{FAULT}"]
    shot = results / "test-reports" / "screenshot.png"
    errors, requests = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            widths = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            first = _verdict(results, f"{MODEL}/{SIDE}/{FAULT}")["first_divergence"]
            page.click(f'.actdiff-graph .gnode[data-node="{first}"]')  # the graph's click shows the node's stats
            graph_info = page.inner_text("#actdiff-graph-info")
            body = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    external = [u for u in requests if not u.startswith(("data:", "file:"))]
    assert not external, external
    assert widths and all(c and w > 0 for c, w in widths), widths
    v = _verdict(results, f"{MODEL}/{SIDE}/{FAULT}")
    _first_screen_holds_the_verdict(" ".join(body.split()), v, FAULT)  # the visible text: nothing folded away
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert first in graph_info and "fail" in graph_info and "local budget (median)" in graph_info, graph_info


@pytest.fixture(scope="module")
def rendered_results(results, rendered, tmp_path_factory) -> Path:
    """A results folder holding the three runs' verdicts and the reports this module rendered with the code under
    test (the pipeline's own reports/ may predate it when results/ci is reused)."""
    out = tmp_path_factory.mktemp("rendered-results")
    for r in RUNS:
        src = results / r / "summary" / "verdict.json"
        (out / r / "summary").mkdir(parents=True)
        shutil.copy(src, out / r / "summary" / "verdict.json")
    shutil.copytree(rendered["index"].parent, out / "reports", ignore=shutil.ignore_patterns("*.png"))
    return out


def test_publish_writes_a_checked_static_site(rendered_results, tmp_path):
    results = rendered_results
    """Issue 18: `actdiff publish RESULTS SITE_DIR` copies the index and every report, writes a manifest of the
    runs, checks every link; a site with a broken or network link, or a run without its report, is refused and
    the previous site stays as it was."""
    from actdiff.cli import main as cli
    from actdiff.layout import Layout
    from actdiff.report.publish import check_links

    site = tmp_path / "site"
    assert cli(["publish", str(results), str(site)]) == 0
    manifest = json.loads((site / "manifest.json").read_text())
    runs = Layout(str(results)).runs_with_verdicts()
    assert [(r["model"], r["side"], r["variant"]) for r in manifest["runs"]] == runs
    for r in manifest["runs"]:
        page = site / r["report"]
        assert page.is_file() and page.stat().st_size == r["report_bytes"], r
        assert r["status"] == _verdict(results, f"{r['model']}/{r['side']}/{r['variant']}")["status"]
    assert (site / "index.html").is_file() and check_links(site) == []
    before = sorted(p.relative_to(site) for p in site.rglob("*"))

    bad = tmp_path / "bad"
    shutil.copytree(results / "reports", bad / "reports")
    for run in runs:  # the verdicts are what publish lists
        src = results / run[0] / run[1] / run[2] / "summary" / "verdict.json"
        (bad / src.relative_to(results)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, bad / src.relative_to(results))
    index = bad / "reports" / "index.html"
    index.write_text(index.read_text() + '<a href="nowhere/x.html">x</a><img src="https://cdn.example/x.png">')
    assert cli(["publish", str(bad), str(site)]) == 1
    problems = check_links(bad / "reports")
    assert any("broken link nowhere/x.html" in p for p in problems)
    assert any("network reference https://cdn.example/x.png" in p for p in problems)
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before  # the previous site is untouched
    m, s, v = runs[0]
    (bad / "reports" / m / s / f"{v}.html").unlink()
    from actdiff.errors import ActdiffError
    from actdiff.report.publish import publish

    with pytest.raises(ActdiffError, match=f"the report of {re.escape(f'{m}/{s}/{v}')} is missing"):
        publish(bad, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_publish_with_quarto_makes_a_website_project(rendered_results, tmp_path):
    """With quarto on PATH the site is a Quarto website project. Quarto cannot be installed here, so this checks
    the project as written (the config's structure, every resource present) and renders its generated index.qmd
    with the fallback renderer (jupytext + pandoc: the same markdown) to check every link of the home page
    resolves in the project; `quarto render` itself is exercised only where quarto exists."""
    import yaml

    from actdiff.report import publish as pub
    from actdiff.report.render import render

    source = tmp_path / "project"
    source.mkdir()
    manifest = pub.build_site(rendered_results, source)
    pub.write_quarto_project(source, manifest)
    cfg = yaml.safe_load((source / pub.QUARTO_PROJECT).read_text())
    assert cfg["project"]["type"] == "website" and cfg["project"]["render"] == ["index.qmd"]
    assert {pub.OVERVIEW, pub.MANIFEST} <= set(cfg["project"]["resources"])
    assert all((source / r).is_file() for r in cfg["project"]["resources"]), cfg["project"]["resources"]
    menus = {m["text"]: m["menu"] for m in cfg["website"]["navbar"]["left"] if "menu" in m}
    assert sorted(menus) == sorted({r["model"] for r in manifest["runs"]})
    assert sum(len(v) for v in menus.values()) == len(manifest["runs"])
    assert render(source / "index.qmd", source / "index.html", {}) in ("fallback", "quarto")
    home = (source / "index.html").read_text()
    assert all(f'href="{r["report"]}"' in home for r in manifest["runs"]) and f'href="{pub.OVERVIEW}"' in home
    assert pub.check_links(source) == []


def test_published_site_opens_from_file_in_chromium(rendered_results, tmp_path):
    """The published site from file://: the index opens, its link to a report leads to the report, whose graph
    answers a click; no request leaves the machine."""
    assert CHROMIUM.is_file(), "Debian chromium is required: apt-get install -y chromium"
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from actdiff.report.publish import publish

    site = tmp_path / "site"
    publish(rendered_results, site)
    requests, errors = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((site / "index.html").as_uri(), wait_until="load")
            page.click('a[href$="fp32%2Bfault%3Dcausal_mask.html"]')
            page.wait_for_load_state("load")
            assert page.url.endswith("causal_mask.html") and "Verdict: FAIL" in page.inner_text("body")
            page.click(".actdiff-graph .gnode")
            info = page.inner_text("#actdiff-graph-info")
        finally:
            browser.close()
    assert not errors, errors
    assert "embeddings" in info  # the first node of the graph
    assert not [u for u in requests if not u.startswith(("data:", "file:"))]


def test_before_after_against_a_baseline_run(results, tmp_path):
    """Issue 18: `actdiff report RESULTS --baseline DIR` renders a run against the same run of a baseline folder.
    The baseline here is the causal-mask fault run standing in as last week's actdiff/fp32: the report must say
    FAIL -> PASS, the cause no longer found, the first divergence gone, the node statuses that changed, and that
    every prompt whose 1 - cosine dropped by more than the margin got better (counted independently here)."""
    from actdiff.cli import main as cli
    from actdiff.report.baseline import COSINE_FLOOR, MARGIN, before_after, prompt_cosines
    from actdiff.report.data import load_run

    base = tmp_path / "baseline"
    (base / MODEL / SIDE).mkdir(parents=True)
    shutil.copy(results / MODEL / "model.json", base / MODEL / "model.json")
    shutil.copytree(results / MODEL / SIDE / FAULT, base / MODEL / SIDE / "fp32", ignore=shutil.ignore_patterns("*.h5"))
    out = tmp_path / "out"
    assert (
        cli(["report", str(results), "--baseline", str(base), "--run", f"{MODEL}/{SIDE}/fp32", "--out", str(out)]) == 0
    )
    text = _text(out / MODEL / SIDE / "fp32.html")
    fault = _verdict(results, f"{MODEL}/{SIDE}/{FAULT}")
    assert "Before / after" in text and "Verdict: FAIL → PASS" in text
    assert f"Causes no longer found: {fault['hypothesis']}" in text
    assert f"first divergence {fault['first_divergence']} → (none)" in text

    new, old = (
        prompt_cosines(load_run(results, MODEL, SIDE, "fp32")),
        prompt_cosines(load_run(base, MODEL, SIDE, "fp32")),
    )
    d_new, d_old = 1 - new, 1 - old.reindex(new.index)
    better = int(((d_old - d_new > COSINE_FLOOR) & (d_old > MARGIN * d_new)).sum())
    assert better > 0 and f"0 got worse and {better} better" in text
    ba = before_after(load_run(results, MODEL, SIDE, "fp32"), base)
    assert ba.differs == []  # same weights and corpus: comparable
    changed = ba.nodes[ba.nodes["status_old"] != ba.nodes["status_new"]]
    assert fault["first_divergence"] in set(changed["node"]) and f"{len(changed)} changed status" in text
    assert set(ba.nodes["status_new"]) == {"pass"}
    index = _text(out / "index.html")  # the index's trend: what each run was in the baseline
    assert "before: FAIL, cosine min" in index and f"{fault['embedding_cosine_min']:.6f} → 1.000000" in index


# ------------------------------------------------------------------------------------------- any prompt
def _embedded_prompts(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="actdiff-prompts-data">(.*?)</script>', page.read_text(), re.S)
    assert m, f"{page} has no embedded prompt data"
    return json.loads(m.group(1))


def _corpus_ids(results: Path, model: str) -> set[str]:
    import pandas as pd

    return {p for f in sorted((results / model / "tokens").glob("shard-*.parquet"))
            for p in pd.read_parquet(f, columns=["prompt_id"])["prompt_id"]}  # fmt: skip


def test_any_prompt_table_holds_the_whole_corpus_and_matches_its_page(results, rendered):
    """Issue 18 item 3: every run's summary prompt_table has one row per prompt of the corpus (47 in CI), its
    error columns are the graph's key nodes, and the JSON embedded in the page parses and says the same (numbers
    rounded: errors to 2 significant digits, cosines to 8)."""
    import numpy as np
    import pandas as pd

    from actdiff.nodes import build_graph
    from actdiff.report.prompt_panel import decode_error

    for r in RUNS:
        model = r.split("/")[0]
        table = pd.read_parquet(results / r / "summary" / "prompt_table.parquet")
        assert len(table) == 47 and set(table["prompt_id"]) == _corpus_ids(results, model), r
        key_nodes = build_graph(json.loads((results / model / "model.json").read_text())["config"]).key_nodes()
        data = _embedded_prompts(rendered[r])
        assert data["nodes"] == key_nodes and len(data["rows"]) == 47, r
        rows = {row[0]: dict(zip(data["columns"], row, strict=True)) for row in data["rows"]}
        for t in table.itertuples():
            e = rows[t.prompt_id]
            assert (e["text"], e["tokens"], data["firsts"][e["first"]], e["failing"]) == (
                t.text, t.tokens, t.first_divergence, t.failing_nodes), (r, t.prompt_id)  # fmt: skip
            assert e["cosine"] == pytest.approx(t.embedding_cosine, abs=1e-8), (r, t.prompt_id)
            assert len(e["err"]) == len(key_nodes)
            decoded = np.asarray([decode_error(c) for c in e["err"]], float)
            exact = np.asarray(t.key_rel_l2, float)
            big = exact > 1e-19  # below 1e-20 the code saturates
            np.testing.assert_allclose(decoded[big], exact[big], rtol=0.06, atol=0)
            assert np.array_equal(exact == 0, decoded == 0) and np.array_equal(np.isnan(exact), np.isnan(decoded))
            assert e["layers"] == list(t.routing_layers) and e["flips"] == list(t.routing_flips)
        moe = model == MODEL
        assert all(len(t.routing_layers) == (2 if moe else 0) for t in table.itertuples()), r
        assert "Any prompt" in _text(rendered[r])


def test_any_prompt_drilldown_in_headless_chromium(results, rendered):
    """Type a prompt id into the search, click its row: the panel shows its first divergence, its final cosine,
    its error at every key node and the routing of its tokens; a worst prompt opened by URL hash shows its values
    next to the reference's."""
    import pandas as pd

    assert CHROMIUM.is_file(), "Debian chromium is required: apt-get install -y chromium"
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    run = f"{MODEL}/{SIDE}/{FAULT}"
    table = pd.read_parquet(results / run / "summary" / "prompt_table.parquet").set_index("prompt_id")
    worst = pd.read_parquet(results / run / "summary" / "drilldown.parquet")["prompt_id"].unique().tolist()
    other = sorted(set(table.index) - set(worst))[0]  # a prompt whose values the run did not keep
    errors = []
    with sync_api.sync_playwright() as pw:
        args = ["--headless", "--no-sandbox", "--disable-gpu"]
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(rendered[run].as_uri(), wait_until="load")
            page.fill("#actdiff-prompt-search", other)
            count = page.inner_text("#actdiff-prompt-count")
            page.click(f'#actdiff-prompt-table tbody tr[data-prompt="{other}"]')
            panel = page.inner_text("#actdiff-prompt-panel")
            page.goto(rendered[run].as_uri() + f"#prompt={worst[0]}", wait_until="load")
            kept = page.inner_text("#actdiff-prompt-panel")
            page.locator("#actdiff-prompts").screenshot(path=str(results / "test-reports" / "any-prompt.png"))
        finally:
            browser.close()
    assert not errors, errors
    assert count.startswith("1 of 47"), count
    t = table.loc[other]
    panel = " ".join(panel.split())
    assert f"first divergence {t.first_divergence}" in panel and f"final cosine {t.embedding_cosine:.8g}" in panel
    assert "not among them" in panel and "layer 1:" in panel and "encoder.layers.3.norm2" in panel, panel
    assert worst[0] in kept and "reference" in kept and "not among them" not in kept, kept


def _replicated(df, n_copies: int):
    import pandas as pd

    return pd.concat([df.assign(prompt_id=df["prompt_id"] + f"~{k}") for k in range(n_copies)], ignore_index=True)


@pytest.mark.parametrize("run", [f"{MODEL}/{SIDE}/{FAULT}", f"minilm-l6/{SIDE}/fp32"])
def test_any_prompt_data_stays_small_at_10000_prompts(results, run, capsys):
    """The embedded block at 10,000 prompts (the CI corpus replicated, built by the aggregation code from
    replicated shard tables; every text padded to the kept 100 characters, the worst case) stays under 3 MB, so
    the page (about 1 MB without it) stays under 5 MB."""
    import math

    import pandas as pd

    from actdiff.compare import prompt_table, worst
    from actdiff.nodes import build_graph
    from actdiff.report.prompt_panel import panel_json

    model = run.split("/")[0]
    key_nodes = build_graph(json.loads((results / model / "model.json").read_text())["config"]).key_nodes()
    stats = results / run / "stats" / "shard-0"
    shard = {t: pd.read_parquet(stats / f"{t}.parquet") for t in ("nodes", "prompts", "routing")}
    copies = math.ceil(10_000 / shard["nodes"]["prompt_id"].nunique())
    big = {t: _replicated(df, copies) for t, df in shard.items()}
    ids = sorted(big["nodes"]["prompt_id"].unique())[:10_000]
    big = {t: df[df["prompt_id"].isin(set(ids))] for t, df in big.items()}
    rows = prompt_table.shard_rows(worst.per_prompt(big["nodes"]), big["nodes"], big["prompts"], big["routing"],
                                   key_nodes)  # fmt: skip
    table = prompt_table.with_texts([rows], []).assign(text="x" * prompt_table.TEXT_CHARS)
    drilldown = pd.read_parquet(results / run / "summary" / "drilldown.parquet")
    size = len(panel_json(table, key_nodes, drilldown).encode("utf-8"))
    small = len(panel_json(pd.read_parquet(results / run / "summary" / "prompt_table.parquet"), key_nodes,
                           drilldown).encode("utf-8"))  # fmt: skip
    with capsys.disabled():
        print(f"\n{run}: embedded prompt data {small} bytes at 47 prompts, {size} bytes at {len(table)} prompts")
    assert len(table) == 10_000 and size < 3 * 2**20, size


def test_any_prompt_data_of_a_12_layer_model_at_10000_prompts_fits_by_thinning_key_nodes(capsys):
    """The released 12-layer NomicBERT-MoE has 64 key nodes (the tiny model 24): at 10,000 prompts its rows alone
    would pass the embedded-data budget, so the panel keeps every k-th key node (first and last always) and says
    so; every prompt stays searchable. Rows are fabricated at the worst case (100-character texts, an error at
    every key node, 6 MoE layers of routing), since no 12-layer run fits in the test's time."""
    import numpy as np
    import pandas as pd

    from actdiff.models.released import released_config
    from actdiff.nodes import build_graph
    from actdiff.report.prompt_panel import EMBED_BUDGET, panel_json, thinned

    graph = build_graph(released_config())
    key_nodes = graph.key_nodes()
    rng = np.random.default_rng(0)
    n, k, moe = 10_000, len(key_nodes), [b.layer for b in graph.moe_blocks()]
    table = pd.DataFrame({
        "prompt_id": [f"p-{i:05d}" for i in range(n)], "text": ["x" * 100] * n,
        "tokens": rng.integers(5, 512, n), "first_divergence": [key_nodes[3]] * n, "failing_nodes": [7] * n,
        "embedding_cosine": 1 - rng.uniform(1e-7, 1e-3, n),
        "key_rel_l2": list(10 ** rng.uniform(-7, -1, (n, k))),
        "routing_layers": [moe] * n, "routing_agreement": list(rng.uniform(0.9, 1, (n, len(moe)))),
        "routing_flips": list(rng.integers(0, 9, (n, len(moe)))),
    })  # fmt: skip
    drilldown = pd.DataFrame({"prompt_id": ["p-00000"] * 2, "node": [key_nodes[0], key_nodes[1]],
                              "ref_first": [np.ones(4)] * 2, "eng_first": [np.ones(4)] * 2})  # fmt: skip
    whole = len(panel_json(table, key_nodes, drilldown).encode("utf-8"))
    guarded = panel_json(table, key_nodes, drilldown, EMBED_BUDGET)
    data = json.loads(guarded)
    with capsys.disabled():
        print(f"\n12 layers, {k} key nodes, 10,000 prompts: {whole} bytes unguarded, {len(guarded.encode())} "
              f"guarded (1 key node in {data['stride']}, {len(data['nodes'])} kept)")
    assert whole > EMBED_BUDGET, "the fabricated worst case no longer needs the guard: the test proves nothing"
    assert len(guarded.encode("utf-8")) <= EMBED_BUDGET and len(data["rows"]) == n
    assert data["stride"] > 1 and data["nodes"] == [key_nodes[i] for i in thinned(k, data["stride"])]
    assert data["nodes"][0] == key_nodes[0] and data["nodes"][-1] == key_nodes[-1]
    assert all(len(r[data["columns"].index("err")]) == len(data["nodes"]) for r in data["rows"][:50])
    assert [v[0] for v in data["values"]["p-00000"]] == [0]  # key_nodes[1] thinned away, positions remapped
