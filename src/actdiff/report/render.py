"""Rendering a ``.qmd`` into one self-contained HTML file.

With ``quarto`` on PATH: ``quarto render <copy> -P key:value ... --to html -M embed-resources:true``.
Without it, the fallback renderer: jupytext reads the ``.qmd`` (its ```` ```{python} ```` chunks, as R
Markdown), the parameters are injected in a cell after the one tagged ``parameters`` (like papermill), an
IPython shell in this process executes the notebook (actdiff.report.shell: the outputs a kernel gives, without
a kernel's process; a failing cell raises :class:`RenderError`), the executed notebook becomes
markdown honouring the Quarto cell options ``echo``, ``output: asis``, ``fig-cap``, ``label``, ``include``,
callouts and tabsets, and pandoc (pypandoc-binary) writes a standalone HTML with embedded resources, a
table of contents and the stylesheet shipped next to this module.

Every render runs in its own temporary working directory, so parallel renders never collide.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import html
import logging
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from ..atomic import atomic_path
from ..errors import ActdiffError

CSS = Path(__file__).with_name("report.css")
REPORTS_DIR = Path(str(resources.files("actdiff").joinpath("data/reports")))  # the packaged .qmd sources
_OPT = re.compile(r"^#\|\s*([\w.-]+)\s*:\s*(.*)$")


class RenderError(ActdiffError):
    """A report could not be rendered (the message names the .qmd, the cell and the error)."""


# ------------------------------------------------------------------------------------------- entry points
def render_report(
    results: str,
    model: str,
    side: str,
    variant: str,
    out_html: str,
    qmd: str | None = None,
    worst_n: int = 20,
    log: logging.Logger | None = None,
    baseline: str | None = None,
) -> str:
    """Render the report of one (model, side, variant) into ``out_html``; returns the renderer used. With
    ``baseline`` (a results folder), the report also compares the run with the same run there."""
    params = {
        "results": str(Path(results).resolve()),
        "model": model,
        "side": side,
        "variant": variant,
        "worst_n": int(worst_n),
        "baseline": str(Path(baseline).resolve()) if baseline else "",
    }
    return render(
        qmd or REPORTS_DIR / "report.qmd", out_html, params, log, title=f"actdiff: {model} / {side} / {variant}"
    )


def render_index(
    results: str,
    runs: list[str] | str,
    out_html: str,
    qmd: str | None = None,
    log: logging.Logger | None = None,
    baseline: str | None = None,
) -> str:
    """Render the index over ``runs`` (``model/side/variant`` strings) into ``out_html``; with ``baseline`` (a
    results folder) each run also shows what it was there."""
    runs = runs if isinstance(runs, str) else ";".join(runs)
    params = {
        "results": str(Path(results).resolve()),
        "runs": runs,
        "baseline": str(Path(baseline).resolve()) if baseline else "",
    }
    return render(qmd or REPORTS_DIR / "index.qmd", out_html, params, log, title="actdiff: all runs")


def render(qmd, out_html, params: dict, log: logging.Logger | None = None, title: str | None = None) -> str:
    """Render ``qmd`` with ``params`` into the self-contained ``out_html``. Returns ``"quarto"`` or
    ``"fallback"``; raises :class:`RenderError` when a cell fails or no HTML is produced."""
    log = log or logging.getLogger("actdiff.report")
    qmd, out_html = Path(qmd).resolve(), Path(out_html).resolve()
    if not qmd.is_file():
        raise RenderError(f"report source {qmd} does not exist")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="actdiff-render-") as tmp:
        work = Path(tmp)
        src = work / qmd.name
        shutil.copyfile(qmd, src)
        quarto = find_quarto()
        if quarto:
            log.info("renderer: quarto (%s)", quarto)
            produced = _render_quarto(quarto, src, params, log)
            kind = "quarto"
        else:
            log.info("renderer: fallback (jupytext, in-process IPython, pandoc)")
            with _collector_paused():
                produced = _render_fallback(src, params, log, title)
            kind = "fallback"
        if not produced.is_file() or produced.stat().st_size == 0:
            raise RenderError(f"rendering {qmd} produced no HTML (expected {produced})")
        with atomic_path(str(out_html)) as tmp_out:
            shutil.copyfile(produced, tmp_out)
    log.info("wrote %s (%.1f kB)", out_html, out_html.stat().st_size / 1024)
    return kind


# ------------------------------------------------------------------------------------------------ quarto
def find_quarto() -> str | None:
    """The quarto executable on PATH, or None (the fallback renderer is used)."""
    return shutil.which("quarto")


def _param_arg(k: str, v) -> str:
    if isinstance(v, bool):
        v = "true" if v else "false"
    return f"{k}:{v}"


def _render_quarto(quarto: str, src: Path, params: dict, log: logging.Logger) -> Path:
    cmd = [quarto, "render", src.name]
    for k, v in params.items():
        cmd += ["-P", _param_arg(k, v)]
    cmd += ["--to", "html", "-M", "embed-resources:true"]
    log.info("running %s", " ".join(cmd))
    p = subprocess.run(cmd, cwd=src.parent, capture_output=True, text=True)
    for line in (p.stdout + p.stderr).splitlines():
        log.info("quarto: %s", line)
    if p.returncode != 0:
        raise RenderError(f"quarto render of {src.name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return src.with_suffix(".html")


# ---------------------------------------------------------------------------------------------- fallback
def _cell_options(source: str) -> tuple[dict, str]:
    """Quarto ``#|`` options at the top of a cell, and the code without them."""
    lines = source.splitlines()
    opts_yaml, i = [], 0
    while i < len(lines) and (lines[i].startswith("#|") or not lines[i].strip()):
        if lines[i].startswith("#|"):
            opts_yaml.append(lines[i][2:].strip())
        i += 1
    try:
        opts = yaml.safe_load("\n".join(opts_yaml)) or {} if opts_yaml else {}
    except yaml.YAMLError as e:
        raise RenderError(f"bad cell options {opts_yaml!r}: {e}") from e
    return (opts if isinstance(opts, dict) else {}), "\n".join(lines[i:])


def _load_notebook(src: Path):
    import jupytext

    # jupytext's own "qmd" format calls `quarto convert`; without quarto, its R Markdown reader parses the
    # same ```{python} chunks (the `#|` options stay in the cell source, which Python ignores).
    return jupytext.reads(src.read_text(encoding="utf-8"), fmt="Rmd")


def _front_matter(nb) -> dict:
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            try:
                return yaml.safe_load(c.source.strip().strip("-")) or {}
            except yaml.YAMLError as e:
                raise RenderError(f"bad YAML front matter: {e}") from e
    return {}


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell assigning ``params`` right after the cell tagged ``parameters`` (papermill style)."""
    from nbformat.v4 import new_code_cell

    pos = None
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        opts, _ = _cell_options(c.source)
        tags = list(opts.get("tags") or []) + list(c.metadata.get("tags", []))
        if "parameters" in tags:
            pos = i
            break
    body = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = new_code_cell("#| echo: false\n# injected parameters\n" + body, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(len(nb.cells) if pos is None else pos + 1, cell)
    if pos is None and params:
        raise RenderError("the report has no cell tagged `parameters` (#| tags: [parameters]) to inject into")


def _execute(nb, work: Path, src: Path, log: logging.Logger) -> None:
    from .shell import CellError, ShellProcessError, execute_notebook

    env = {"MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        n = execute_notebook(nb, work)
    except CellError as e:
        msg = f"a cell of {src.name} failed, no report written:\n{e.source}\n{_strip_ansi(e.text)[-6000:]}"
        raise RenderError(msg) from e
    except ShellProcessError as e:
        raise RenderError(f"{src.name} could not be executed, no report written: {e}") from e
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log.info("executed %d cells", n)


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def _fence(text: str, lang: str = "") -> str:
    n = max([3] + [len(m) + 1 for m in re.findall(r"`{3,}", text)])
    return f"{'`' * n}{lang}\n{text.rstrip()}\n{'`' * n}\n"


def notebook_to_markdown(nb, work: Path, defaults: dict) -> str:
    """Markdown of an executed notebook honouring the Quarto cell options."""
    parts, nfig = [], 0
    for c in nb.cells:
        if c.cell_type == "raw":
            continue  # front matter (title and options are passed to pandoc separately)
        if c.cell_type == "markdown":
            parts.append(c.source + "\n")
            continue
        opts, code_src = _cell_options(c.source)
        o = {**defaults, **opts}
        if o.get("include") is False:
            continue
        label = o.get("label")
        if label and not str(label).startswith("fig-"):
            parts.append(f"[]{{#{label}}}\n")
        if o.get("echo", True) is True and code_src.strip():
            parts.append(_fence(code_src, "python"))
        if o.get("output") is False:
            continue
        asis = o.get("output") == "asis"
        for out in c.get("outputs", []):
            ot = out.get("output_type")
            if ot == "stream":
                if out.get("name") == "stderr" and o.get("warning") is False:
                    continue
                parts.append(out["text"] + "\n" if asis else _fence(out["text"]))
            elif ot in ("display_data", "execute_result"):
                data = out.get("data", {})
                if "image/png" in data or "image/svg+xml" in data:
                    nfig += 1
                    if "image/png" in data:
                        name = f"figure-{nfig}.png"
                        (work / name).write_bytes(base64.b64decode(data["image/png"]))
                    else:
                        name = f"figure-{nfig}.svg"
                        (work / name).write_text(data["image/svg+xml"])
                    cap = o.get("fig-cap", "")
                    attr = f"{{#{label}}}" if label and str(label).startswith("fig-") and nfig else ""
                    parts.append(f"![{cap}]({name}){attr}\n")
                elif "text/markdown" in data:
                    parts.append(data["text/markdown"] + "\n")
                elif "text/html" in data:
                    parts.append(f"```{{=html}}\n{data['text/html']}\n```\n")
                elif "text/plain" in data:
                    parts.append(data["text/plain"] + "\n" if asis else _fence(data["text/plain"]))
    return tabsets_to_css_tabs("\n".join(parts))


_TABSET = re.compile(r"^(:{3,})\s*\{\.panel-tabset[^}]*\}\s*$")


def tabsets_to_css_tabs(md: str) -> str:
    """``::: {.panel-tabset}`` with headings inside -> a pure-CSS tab UI (radio buttons, no JavaScript)."""
    lines, out, i, n_set = md.splitlines(), [], 0, 0
    while i < len(lines):
        m = _TABSET.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        fence, depth, j, body = m.group(1), 0, i + 1, []
        while j < len(lines):  # find the matching closing fence (nested divs allowed)
            s = lines[j].strip()
            if re.match(r"^:{3,}\s*\S", s):
                depth += 1
            elif re.fullmatch(r":{3,}", s):
                if depth == 0:
                    break
                depth -= 1
            body.append(lines[j])
            j += 1
        levels = [len(h) for h in re.findall(r"^(#{1,6})\s", "\n".join(body), flags=re.M)]
        if not levels:
            out.extend([lines[i], *body, fence])
            i = j + 1
            continue
        lvl, tabs, cur = min(levels), [], None
        for b in body:
            h = re.match(rf"^#{{{lvl}}}\s+(.*)$", b)
            if h:
                cur = [h.group(1).strip(), []]
                tabs.append(cur)
            elif cur is not None:
                cur[1].append(b)
        n_set += 1
        out.append("::: {.tabset}")
        for k, (title, _content) in enumerate(tabs):
            tid = f"tabset-{n_set}-{k}"
            checked = " checked" if k == 0 else ""
            out.append(
                f'`<input type="radio" name="tabset-{n_set}" id="{tid}" class="tab-radio"{checked}>'
                f'<label for="{tid}" class="tab-label">`{{=html}}{title}`</label>`{{=html}}'
            )
        out.append("")
        for k, (_, content) in enumerate(tabs):
            out += ["", f"::: {{.tab-panel .tab-panel-{k}}}", *content, ":::", ""]
        out += [":::", ""]
        i = j + 1
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while the fallback renders, and after it as it was before. A report's
    cells import matplotlib and pandas and draw six figures: hundreds of thousands of container objects, which set
    off ~500 young and 5 full collections, 0.40-0.63 of a render job's 4.3-5.4 CPU-s (tiny model, Zen 4); with the
    collector paused, 0.12-0.13 s remain (its first collection after the render). Only cycles wait to be freed
    (figures and their artists: +17 MB peak RSS measured), until the collector next runs; a render job's process
    ends first (bench/README.md, "the reports' cyclic collector paused")."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _render_fallback(src: Path, params: dict, log: logging.Logger, title: str | None) -> Path:
    import pypandoc

    work = src.parent
    nb = _load_notebook(src)
    fm = _front_matter(nb)
    inject_parameters(nb, params)
    _execute(nb, work, src, log)
    defaults = dict(fm.get("execute") or {})
    md = notebook_to_markdown(nb, work, defaults)
    (work / "report.md").write_text(md, encoding="utf-8")
    out = src.with_suffix(".html")
    title = str(title or fm.get("title") or src.stem)
    args = [
        "--standalone",
        "--toc",
        "--toc-depth=2",
        "--metadata",
        f"title={title}",
        "--css",
        str(CSS),
        f"--resource-path={work}",
        "--section-divs",
    ]
    try:
        pypandoc.convert_text(md, "html", format="markdown", extra_args=args, outputfile=str(out), cworkdir=str(work))
    except (RuntimeError, OSError) as e:
        raise RenderError(f"pandoc failed on the markdown of {src.name} (kept in {work}/report.md): {e}") from e
    out.write_text(embed_resources(out.read_text(encoding="utf-8"), work), encoding="utf-8")
    return out


_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^":]+)(")')
_STYLESHEET = re.compile(r'<link rel="stylesheet" href="([^"]+)" />')
_MIME = {".png": "image/png", ".svg": "image/svg+xml"}


def embed_resources(html_text: str, work: Path) -> str:
    """The page with its figures and stylesheet inside it: each ``<img src>`` of a file the render wrote (a PNG or
    SVG in ``work``) as a data URI, the stylesheet as a ``<style>`` block. Pandoc's --embed-resources did this by
    parsing and writing the whole page again: 0.14 of its 0.35 s a report. Anything else the page points to
    (links are not resources) is left as it is; a figure that is not there is an error."""

    def image(m: re.Match) -> str:
        f = work / m.group(2)
        if f.suffix not in _MIME or not f.is_file():
            raise RenderError(f"the rendered page shows {m.group(2)!r}, which the render did not write in {work}")
        return f"{m.group(1)}data:{_MIME[f.suffix]};base64,{base64.b64encode(f.read_bytes()).decode()}{m.group(3)}"

    def style(m: re.Match) -> str:
        return f'<style type="text/css">\n{Path(html.unescape(m.group(1))).read_text(encoding="utf-8")}</style>'

    page = _STYLESHEET.sub(style, _IMG_SRC.sub(image, html_text))
    if 'rel="stylesheet"' in page:  # another pandoc's markup: the page would point at a file it does not hold
        raise RenderError("the rendered page links a stylesheet in a form embed_resources does not read")
    return page
