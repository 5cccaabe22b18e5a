"""Executing a notebook's code cells in an IPython shell inside this process (the fallback renderer's executor).

The cells run in the same IPython the Jupyter kernel runs them in (``InteractiveShell``: magics, ``display``,
the display hook of a cell's last expression, ``;`` to silence it), and each cell's outputs are recorded in
nbformat's shapes, as nbclient records a kernel's messages: ``stream`` (stdout and stderr, in the order they
were written, displays between them), ``display_data`` and ``execute_result`` with every representation the
formatters give. What is left out is the kernel's process and its messaging: a report's kernel cost 0.85-0.96
CPU-s to start and stop and its figures went through ZeroMQ as base64 (bench/README.md "Reports rendered in
the job's process"). A render job is a process of its own, so the shell's state never leaks between reports;
the shell is created for one notebook and cleared after it, the process's ``__main__``, working directory,
``sys.path``, streams and root logger (a kernel's has no handler while the cells run) restored. A process that
already runs an IPython shell (the API called from a notebook) keeps it: the cells then run in a child process
(``python -m actdiff.report.shell``), the same way.

Like the kernel the workflow ran before, the shell keeps no history file (parallel renders share ``~/.ipython``)
and leaves matplotlib's backend to ``MPLBACKEND`` (the renderer sets Agg, so pyplot figures are never shown
unless a cell displays them: the reports display ``IPython.display.Image`` objects).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

CELL_TIMEOUT_S = 1200  # the limit nbclient was given per cell


class CellError(Exception):
    """A cell raised (or ran past its time): ``index`` is its position among the notebook's cells, ``text`` its
    traceback."""

    def __init__(self, index: int, source: str, text: str):
        super().__init__(f"cell {index} failed:\n{source}\n{text}")
        self.index, self.source, self.text = index, source, text


class ShellProcessError(RuntimeError):
    """The child process running the cells (a caller's IPython shell in this process) died or wrote no result."""


class _Sink:
    """The outputs of the cell being run, in nbformat's shapes."""

    def __init__(self):
        self.outputs: list = []

    def stream(self, name: str, text: str) -> None:
        from nbformat.v4 import new_output

        last = self.outputs[-1] if self.outputs else None
        if last is not None and last.output_type == "stream" and last.name == name:
            last.text += text
        else:
            self.outputs.append(new_output("stream", name=name, text=text))

    def rich(self, kind: str, data: dict, metadata: dict | None, count: int | None = None) -> None:
        from nbformat.v4 import new_output

        extra = {"execution_count": count} if kind == "execute_result" else {}
        self.outputs.append(new_output(kind, data=dict(data), metadata=dict(metadata or {}), **extra))


class _Stream:
    """A text stream writing into the sink (``sys.stdout`` / ``sys.stderr`` while a cell runs)."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, sink: _Sink, name: str):
        self._sink, self.name = sink, name

    def write(self, text: str) -> int:
        if text:
            self._sink.stream(self.name, str(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _shell_classes(sink: _Sink):
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            sink.rich("display_data", data, metadata)

        def clear_output(self, wait=False):
            sink.outputs.clear()

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            sink.rich("execute_result", format_dict, md_dict, self.prompt_count)

        def finish_displayhook(self):
            pass

    class Shell(InteractiveShell):
        displayhook_class = Hook
        display_pub_class = Publisher

    return Shell


@contextlib.contextmanager
def _process_state(work: Path, sink: _Sink):
    """cwd, sys.path[0], ``__main__``, the streams and the root logger as a kernel started in ``work`` has them
    (no handler, level WARNING: a record a cell logs reaches the cell's stderr through logging's last resort, as
    in a kernel, not the rule's log); restored after."""
    root = logging.getLogger()
    saved = (os.getcwd(), list(sys.path), sys.modules.get("__main__"), sys.stdout, sys.stderr)
    saved_log = (root.handlers[:], root.level)
    os.chdir(work)
    sys.path.insert(0, str(work))
    sys.stdout, sys.stderr = _Stream(sink, "stdout"), _Stream(sink, "stderr")
    root.handlers, root.level = [], logging.WARNING
    try:
        yield
    finally:
        cwd, path, main, sys.stdout, sys.stderr = saved
        root.handlers, root.level = saved_log
        os.chdir(cwd)
        sys.path[:] = path
        if main is not None:
            sys.modules["__main__"] = main


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the cell after ``seconds``. Only in the main thread (signals reach no other) and
    where nothing else uses SIGALRM (its handler and timer are left alone then)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGALRM) not in (
        signal.SIG_DFL,
        signal.SIG_IGN,
    ):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"the cell ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run_cell(shell, sink: _Sink, index: int, cell, timeout: int) -> None:
    sink.outputs = []
    with _time_limit(timeout):
        result = shell.run_cell(cell.source, store_history=True, silent=False)
    cell.outputs = sink.outputs
    cell.execution_count = shell.execution_count - 1
    err = result.error_before_exec or result.error_in_exec
    if err is not None:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        raise CellError(index, cell.source, text)


def execute_notebook(nb, work: Path, timeout: int = CELL_TIMEOUT_S) -> int:
    """Run every code cell of ``nb`` in order in a fresh IPython shell with ``work`` as the working directory,
    storing each cell's outputs on it; stops at the first failing cell with :class:`CellError`. Returns the
    number of code cells run. In this process, unless it already runs an IPython shell (a caller's notebook or
    terminal: IPython allows one per process, and the report's cells must not run in the caller's): then in a
    child process, the same way."""
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():
        return _execute_in_child(nb, Path(work), timeout)
    return _execute_here(nb, Path(work), timeout)


def _execute_in_child(nb, work: Path, timeout: int) -> int:
    import nbformat

    src, out = work / ".actdiff-shell-in.ipynb", work / ".actdiff-shell-out.json"
    nbformat.write(nb, str(src))
    cmd = [sys.executable, "-m", "actdiff.report.shell", str(src), str(out), str(work), str(timeout)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not out.is_file():
        raise ShellProcessError(f"the report's shell process failed (exit {p.returncode}): {p.stderr[-4000:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    done = nbformat.read(str(src), as_version=4)
    for cell, ran in zip(nb.cells, done.cells, strict=True):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = ran.outputs, ran.execution_count
    if result.get("error"):
        e = result["error"]
        raise CellError(e["index"], e["source"], e["text"])
    return int(result["cells"])


def _main(argv: list[str]) -> int:
    """``python -m actdiff.report.shell IN.ipynb OUT.json WORK TIMEOUT``: run IN's cells here, write the executed
    notebook back to IN and ``{"cells": n}`` or ``{"error": {...}}`` to OUT (the child of _execute_in_child)."""
    import nbformat

    src, out, work, timeout = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    nb = nbformat.read(str(src), as_version=4)
    try:
        result = {"cells": _execute_here(nb, work, timeout)}
    except CellError as e:
        result = {"error": {"index": e.index, "source": e.source, "text": e.text}}
    nbformat.write(nb, str(src))
    out.write_text(json.dumps(result), encoding="utf-8")
    return 0


def _execute_here(nb, work: Path, timeout: int) -> int:
    from traitlets.config import Config

    sink = _Sink()
    config = Config()
    config.HistoryManager.enabled = False  # no sqlite history shared by parallel renders
    Shell = _shell_classes(sink)
    n = 0
    with _process_state(work, sink):
        shell = Shell.instance(config=config)
        shell.showtraceback = lambda *a, **k: None  # the error is raised with its traceback, not printed
        try:
            for i, cell in enumerate(nb.cells):
                if cell.cell_type == "code":
                    _run_cell(shell, sink, i, cell, timeout)
                    n += 1
        finally:
            Shell.clear_instance()
    return n


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
