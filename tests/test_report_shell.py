"""The fallback renderer's in-process executor (actdiff.report.shell): a notebook's cells run in an IPython shell
in this process with the outputs a Jupyter kernel gives them, and the process is left as it was found."""

from __future__ import annotations

import os
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from actdiff.report.shell import CellError, execute_notebook


def _nb(*sources: str):
    return new_notebook(cells=[new_code_cell(s) for s in sources])


def _kinds(cell) -> list[tuple]:
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(("stream", o.name, o.text))
        else:
            out.append((o.output_type, sorted(o.data)))
    return out


def test_outputs_keep_the_kernels_shapes_and_order(tmp_path):
    nb = _nb(
        "print('a')\n"
        "from IPython.display import Markdown, display\n"
        "display(Markdown('**m**'))\n"
        "import sys; print('warned', file=sys.stderr)\n"
        "print('b'); print('c')\n"
        "41 + 1",
        "x = 5\nx;",  # a trailing semicolon silences the last expression, as in a kernel
        "x * 2",
    )
    nb.cells.insert(1, new_markdown_cell("text between"))
    assert execute_notebook(nb, tmp_path) == 3
    assert _kinds(nb.cells[0]) == [
        ("stream", "stdout", "a\n"),
        ("display_data", ["text/markdown", "text/plain"]),
        ("stream", "stderr", "warned\n"),
        ("stream", "stdout", "b\nc\n"),
        ("execute_result", ["text/plain"]),
    ]
    assert nb.cells[0].outputs[1].data["text/markdown"] == "**m**"
    assert nb.cells[0].outputs[-1].data["text/plain"] == "42"
    assert nb.cells[2].outputs == []
    assert nb.cells[3].outputs[0].data["text/plain"] == "10"
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, 2, 3]
    nbformat.validate(nb)  # the outputs are what nbformat (and notebook_to_markdown) expects


def test_an_image_display_carries_its_png(tmp_path):
    nb = _nb(
        "import io\n"
        "from matplotlib.figure import Figure\n"
        "from matplotlib.backends.backend_agg import FigureCanvasAgg\n"
        "from IPython.display import Image\n"
        "fig = Figure(); FigureCanvasAgg(fig); fig.add_subplot().plot([0, 1])\n"
        "buf = io.BytesIO(); fig.savefig(buf, format='png')\n"
        "Image(data=buf.getvalue(), format='png')"
    )
    execute_notebook(nb, tmp_path)
    (out,) = nb.cells[0].outputs
    assert out.output_type == "execute_result" and "image/png" in out.data
    assert len(out.data["image/png"]) > 1000  # base64 of a real PNG, as nbclient stores it


def test_cells_run_in_the_work_folder_with_ipython_features(tmp_path):
    (tmp_path / "helper_mod_for_shell_test.py").write_text("VALUE = 'from work'\n")
    nb = _nb(
        "import os; cwd = os.getcwd()\ncwd",
        "import helper_mod_for_shell_test as h\nh.VALUE",  # the kernel's sys.path starts with its folder
        "here = %pwd\nhere",
    )
    before = (os.getcwd(), list(sys.path), sys.stdout, sys.stderr, sys.modules["__main__"])
    execute_notebook(nb, tmp_path)
    assert nb.cells[0].outputs[0].data["text/plain"] == repr(str(tmp_path))
    assert nb.cells[1].outputs[0].data["text/plain"] == "'from work'"
    assert nb.cells[2].outputs[0].data["text/plain"] == repr(str(tmp_path))
    assert (os.getcwd(), list(sys.path), sys.stdout, sys.stderr, sys.modules["__main__"]) == before
    sys.modules.pop("helper_mod_for_shell_test", None)


def test_a_failing_cell_is_named_and_the_process_restored(tmp_path):
    nb = _nb("y = 3", "print('before the error')\nraise ValueError(f'boom-{y}')", "never = 1")
    before = (os.getcwd(), list(sys.path), sys.stdout, sys.stderr)
    with pytest.raises(CellError) as e:
        execute_notebook(nb, tmp_path)
    assert e.value.index == 1
    assert "raise ValueError" in e.value.source
    assert "ValueError: boom-3" in e.value.text and "Traceback" in e.value.text
    assert nb.cells[1].outputs[0].text == "before the error\n"  # outputs up to the error are kept
    assert nb.cells[2].outputs == []
    assert (os.getcwd(), list(sys.path), sys.stdout, sys.stderr) == before


def test_a_syntax_error_is_a_cell_error(tmp_path):
    with pytest.raises(CellError, match="SyntaxError"):
        execute_notebook(_nb("def broken(:\n    pass"), tmp_path)


def test_each_notebook_gets_a_fresh_shell(tmp_path):
    execute_notebook(_nb("left_behind = 1"), tmp_path)
    with pytest.raises(CellError, match="NameError"):
        execute_notebook(_nb("left_behind"), tmp_path)


def test_a_cell_past_its_time_limit_fails(tmp_path):
    with pytest.raises(CellError, match="more than 1 s"):
        execute_notebook(_nb("import time\nwhile True: time.sleep(0.05)"), tmp_path, timeout=1)


def test_no_history_file_is_written(tmp_path, monkeypatch):
    """Parallel renders share ~/.ipython: the shell keeps no sqlite history there."""
    ipdir = tmp_path / "ipython"
    monkeypatch.setenv("IPYTHONDIR", str(ipdir))
    work = tmp_path / "work"
    work.mkdir()
    execute_notebook(_nb("1 + 1", "2 + 2"), work)
    assert not list(ipdir.rglob("history.sqlite*"))


def test_a_callers_ipython_shell_is_left_alone(tmp_path):
    """Called from a notebook or IPython (a shell already runs in the process): the cells run in a child process,
    with the same outputs and errors, and the caller's shell keeps its instance and its variables."""
    from IPython.core.interactiveshell import InteractiveShell

    main = sys.modules["__main__"]  # IPython installs its own __main__ module: pytest's is put back below
    outer = InteractiveShell.instance()
    try:
        outer.user_ns["mine"] = 1
        nb = _nb("import os; print(os.getpid())\nmine = 2\nmine * 21")
        assert execute_notebook(nb, tmp_path) == 1
        assert int(nb.cells[0].outputs[0].text) != os.getpid()
        assert nb.cells[0].outputs[1].data["text/plain"] == "42"
        assert InteractiveShell.instance() is outer and outer.user_ns["mine"] == 1
        with pytest.raises(CellError) as e:
            execute_notebook(_nb("x = 1", "raise KeyError('in-child')"), tmp_path)
        assert e.value.index == 1 and "KeyError: 'in-child'" in e.value.text
    finally:
        InteractiveShell.clear_instance()
        sys.modules["__main__"] = main


def test_a_cell_logs_as_in_a_kernel_and_the_callers_logging_is_kept(tmp_path, caplog):
    """A kernel's root logger has no handler: a cell's warning reaches its stderr (logging's last resort), its
    info goes nowhere; the rule's own log handlers see neither, and get their logger back after the cells."""
    import logging

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    nb = _nb("import logging\nlogging.getLogger('cell').info('quiet')\nlogging.getLogger('cell').warning('loud')")
    with caplog.at_level(logging.INFO):
        execute_notebook(nb, tmp_path)
        assert not [r for r in caplog.records if r.name == "cell"]
    assert [(o.name, o.text) for o in nb.cells[0].outputs] == [("stderr", "loud\n")]
    assert (root.handlers, root.level) == before


def test_the_page_holds_its_figures_and_stylesheet(tmp_path):
    """render.embed_resources (the fallback renderer, after pandoc): each figure the render wrote becomes a data
    URI, the stylesheet a <style> block; links and data URIs stay as they are; a figure that is not there is a
    RenderError naming it."""
    import base64

    from actdiff.report.render import RenderError, embed_resources

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    (tmp_path / "figure-1.png").write_bytes(png)
    (tmp_path / "figure-2.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    css = tmp_path / "a & b.css"
    css.write_text("body { color: #123; }\n")
    page = (
        '<head><link rel="stylesheet" href="' + str(tmp_path / "a &amp; b.css") + '" /></head><body>'
        '<img src="figure-1.png" alt="one" /><p><img class="w" src="figure-2.svg" /></p>'
        '<a href="../index.html">index</a><img src="data:image/png;base64,AAAA" /></body>'
    )
    out = embed_resources(page, tmp_path)
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="one" />' in out
    assert 'src="data:image/svg+xml;base64,' in out and "figure-" not in out
    assert '<style type="text/css">\nbody { color: #123; }\n</style>' in out and "<link" not in out
    assert '<a href="../index.html">index</a>' in out and 'src="data:image/png;base64,AAAA"' in out
    with pytest.raises(RenderError, match="figure-3.png"):
        embed_resources('<img src="figure-3.png" />', tmp_path)
    with pytest.raises(RenderError, match="stylesheet"):
        embed_resources(f'<link href="{css}" rel="stylesheet">', tmp_path)
