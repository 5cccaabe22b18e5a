"""``actdiff publish RESULTS SITE_DIR``: the rendered reports as a static site.

The site is the index, every run's report (self-contained HTML: figures, styles and scripts inlined, so no
assets folder is needed and nothing is fetched) and ``manifest.json`` describing the runs, laid out exactly as
``RESULTS/reports/`` (the index links reports by relative paths), so it works from any static host and from
``file://``. Every local link of every page is checked before the site replaces SITE_DIR, and no page may
reference the network. The site is built in a temporary folder beside SITE_DIR and renamed into place, so a
failed publish leaves the previous site as it was.

With ``quarto`` on PATH the site is a Quarto website project (:func:`write_quarto_project`): ``_quarto.yml``
(``type: website``, a navbar per model) and a generated ``index.qmd`` listing every run from the manifest, with
the rendered reports, the all-runs overview (our index, as ``overview.html``) and the manifest as the project's
resources; ``quarto render`` builds it and its output folder is what gets checked and published. Without quarto
the site is the reports folder as rendered (the index is the overview itself).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..atomic import write_json_atomic
from ..errors import ActdiffError
from ..layout import Layout
from .render import find_quarto

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
QUARTO_PROJECT = "_quarto.yml"
QUARTO_OUTPUT = "_site"
OVERVIEW = "overview.html"  # our all-runs index inside a Quarto website (its home page is index.qmd)
_LINK = re.compile(r"""<(?:a|link|img|script|iframe|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)


def _run_entry(layout: Layout, run: tuple[str, str, str]) -> dict:
    model, side, variant = run
    report = Path(layout.report(model, side, variant))
    if not report.is_file():
        raise ActdiffError(
            f"{report}: the report of {model}/{side}/{variant} is missing (the run has a verdict); render it with "
            f"`actdiff run {report}` (or `make report`) and publish again"
        )
    v = json.loads(Path(layout.verdict(model, side, variant)).read_text(encoding="utf-8"))
    rel = report.relative_to(Path(layout.index()).parent)  # the site is laid out as the reports folder
    return {
        "model": model,
        "side": side,
        "variant": variant,
        "status": v.get("status"),
        "prompts": v.get("prompts"),
        "failing_nodes": v.get("failing_nodes"),
        "first_divergence": v.get("first_divergence"),
        "causes": [c.get("hypothesis") for c in v.get("causes") or []],
        "embedding_cosine_min": v.get("embedding_cosine_min"),
        "corpus_sha256": v.get("corpus_sha256"),
        "report": rel.as_posix(),
        "report_sha256": hashlib.sha256(report.read_bytes()).hexdigest(),
        "report_bytes": report.stat().st_size,
    }


def local_links(page: Path) -> list[str]:
    """The href/src targets of a page, HTML entities decoded."""
    return [html.unescape(t) for t in _LINK.findall(page.read_text(encoding="utf-8", errors="replace"))]


def check_links(site: Path) -> list[str]:
    """Problems of a site: a local link to a file that is not there, or a reference to the network (which
    breaks offline viewing and leaks the reader's address). Fragments and data: URIs are fine."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        for target in local_links(page):
            parts = urlsplit(target)
            if parts.scheme in ("http", "https") or target.startswith("//"):
                problems.append(f"{page.relative_to(site)}: network reference {target}")
            elif parts.scheme or not parts.path:  # data:, javascript:, mailto:, #fragment
                continue
            elif not (page.parent / unquote(parts.path)).is_file():
                problems.append(f"{page.relative_to(site)}: broken link {target}")
    return problems


def build_site(results: str | Path, staging: Path) -> dict:
    """Copy the index and every report into ``staging`` and write the manifest; returns the manifest."""
    layout = Layout(str(results))
    index = Path(layout.index())
    if not index.is_file():
        raise ActdiffError(f"{index}: no index page; render the reports (`make report`) before publishing")
    runs = layout.runs_with_verdicts()
    if not runs:
        raise ActdiffError(f"{results}: no run with a verdict to publish")
    entries = [_run_entry(layout, r) for r in runs]
    shutil.copytree(index.parent, staging, dirs_exist_ok=True)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "generated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results": str(Path(results).resolve()),
        "index": "index.html",
        "runs": entries,
    }
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def quarto_index_qmd(manifest: dict) -> str:
    """The website's home page: every run of the manifest with its status and a link to its report."""
    from .sections import code, esc  # the reports' own markdown cell writers (imported here: matplotlib)

    head = ["model", "engine", "variant", "status", "prompts", "failing nodes", "first divergence",
            "embedding cosine min", "report"]  # fmt: skip
    lines = ["---", 'title: "actdiff: published runs"', "---", "",
             f"{len(manifest['runs'])} run(s), published {manifest['generated_utc']}. "
             f"[All runs, with trends and embeddings]({OVERVIEW}); the runs as data: [manifest.json]({MANIFEST}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in manifest["runs"]:
        cells = [esc(r[k]) for k in ("model", "side", "variant", "status", "prompts", "failing_nodes")]
        cells += [code(r.get("first_divergence")), esc(r["embedding_cosine_min"])]
        lines.append("| " + " | ".join(cells) + f" | [report]({r['report']}) |")
    return "\n".join(lines) + "\n"


def quarto_config(manifest: dict) -> dict:
    """``_quarto.yml``: a website whose navbar has the runs page, the overview and one menu per model."""
    models: dict[str, list] = {}
    for r in manifest["runs"]:
        models.setdefault(r["model"], []).append({"text": f"{r['side']} {r['variant']}", "href": r["report"]})
    navbar = [{"text": "Runs", "href": "index.qmd"}, {"text": "Overview", "href": OVERVIEW}]
    navbar += [{"text": m, "menu": runs} for m, runs in models.items()]
    return {
        "project": {"type": "website", "output-dir": QUARTO_OUTPUT, "render": ["index.qmd"],
                    "resources": [OVERVIEW, MANIFEST, *(r["report"] for r in manifest["runs"])]},
        "website": {"title": "actdiff", "navbar": {"left": navbar}},
        "format": {"html": {"embed-resources": False, "toc": False}},
    }  # fmt: skip


def write_quarto_project(site: Path, manifest: dict) -> None:
    """Make the built site folder a Quarto website project's source (the overview moved out of index.html)."""
    import yaml

    (site / "index.html").rename(site / OVERVIEW)
    (site / QUARTO_PROJECT).write_text(yaml.safe_dump(quarto_config(manifest), sort_keys=False), encoding="utf-8")
    (site / "index.qmd").write_text(quarto_index_qmd(manifest), encoding="utf-8")


def render_quarto_site(quarto: str, source: Path) -> Path:
    """``quarto render`` the project in ``source``; returns its output folder."""
    import subprocess

    p = subprocess.run([quarto, "render"], cwd=source, capture_output=True, text=True)
    out = source / QUARTO_OUTPUT
    if p.returncode != 0 or not (out / "index.html").is_file():
        raise ActdiffError(f"quarto render of the site project {source} failed (exit {p.returncode}):\n"
                           f"{p.stderr[-3000:]}")  # fmt: skip
    return out


def publish(results: str | Path, site_dir: str | Path) -> dict:
    """Build the site of ``results`` and put it at ``site_dir`` (replacing a previous site as one rename)."""
    site = Path(site_dir).resolve()
    if Path(results).resolve() in (site, *site.parents):
        raise ActdiffError(f"{site}: the site folder must not be inside the results folder {results}")
    site.parent.mkdir(parents=True, exist_ok=True)
    staging = site.with_name(f".{site.name}.publish-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        manifest = build_site(results, staging)
        built, quarto = staging, find_quarto()
        if quarto:
            write_quarto_project(staging, manifest)
            built = render_quarto_site(quarto, staging)
        problems = check_links(built)
        if problems:
            raise ActdiffError("the site has broken or network links:\n  " + "\n  ".join(problems[:20]))
        old = site.with_name(f".{site.name}.old-{os.getpid()}")
        if site.exists():
            site.rename(old)
        built.rename(site)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="actdiff publish", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the results folder of a run (its reports/ must be rendered)")
    ap.add_argument("site_dir", help="where the static site goes (replaced as a whole)")
    args = ap.parse_args(argv)
    m = publish(args.results, args.site_dir)
    print(f"published {len(m['runs'])} run(s) to {args.site_dir} (open {Path(args.site_dir) / 'index.html'})")
    return 0
