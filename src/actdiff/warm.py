"""A warm process per workflow run: each Snakemake script job runs in a fork of it, with the libraries loaded.

Every job of the workflow is a fresh Python process that imports what its rule needs before it does any work:
numpy, pyarrow, pandas, h5py, scipy, matplotlib, IPython and jupytext, and our own modules; torch and transformers
for the tokenizers, the reference and the ONNX export. In the default report's 163 jobs that is about a tenth of the
run's CPU (0.4 s a statistics job, 0.9 s a report, 1.5-3 s a job that loads torch: bench/README.md). ``actdiff run``
therefore starts one warm process beside Snakemake (:func:`start`): it imports those libraries once (PRELOAD, then
listening on a Unix socket, PRELOAD_LATER while no job waits). A script job's adapter hands itself over first thing
(:func:`hand_over`; as its interpreter starts, before Snakemake's preamble, through the sitecustomize start() puts on
the jobs' PYTHONPATH: :func:`hand_over_early`): it sends its command line, working directory, environment and
standard streams, and the warm process forks a child that runs the adapter's script from the top, as Snakemake would
have, with everything already imported. The job's own process waits, passes on the signals it is sent, and exits as
the child did.

What a job is to Snakemake does not change: its process runs for as long as the job, its exit status (or the signal
that ended it) is the job's, a SIGTERM reaches the job. A job whose process is killed outright (SIGKILL: a timeout, a
cancelled run) takes its child with it: the child watches the connection to the job's process and kills itself when
that process is gone, so no orphan writes outputs after Snakemake has given up on the job (they are written to a
temporary name and renamed, actdiff.atomic, so a killed job leaves none either way). Where the warm process is not
there (not started yet, another way of running Snakemake, a job SLURM runs: its limits and accounting must hold
the job's own process) the job runs in its own process as before.

Fork safety: the warm process never starts a thread. It loads the libraries with one BLAS thread (OpenBLAS would
start its pool at load) and checks that it is alone in its process before serving; a child sets its thread counts
as every job does (actdiff.workflow_support.pin_threads) and reads the kernel path from its own environment.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import weakref
from pathlib import Path

SOCKET_ENV = "ACTDIFF_WARM_SOCKET"  # the warm process's socket, for the jobs of the run
SWITCH_ENV = "ACTDIFF_WARM"  # "0": no warm process (every job in a process of its own)
# Snakemake arguments after which no job runs: no warm process is started for them
NO_JOBS_FLAGS = frozenset({"-n", "--dry-run", "--dryrun", "--lint", "--list", "-l", "--list-rules", "--summary",
                           "-S", "--detailed-summary", "-D", "--dag", "--rulegraph", "--filegraph", "--version",
                           "-v", "--help", "-h", "--unlock", "--cleanup-metadata", "--list-target-rules"})  # fmt: skip
# What the workflow's jobs import, loaded once in the warm process (any that is not installed is left out)
PRELOAD = (
    "numpy", "scipy.optimize", "scipy.special", "pyarrow", "pyarrow.compute", "pyarrow.parquet", "pyarrow.dataset",
    "pandas", "h5py", "yaml", "threadpoolctl", "safetensors", "matplotlib.figure", "matplotlib.backends.backend_agg",
    "IPython.core.interactiveshell", "IPython.core.completer", "jupytext", "nbformat", "pypandoc", "snakemake.script",
    "actdiff.workflow_support", "actdiff.pipeline", "actdiff.layout", "actdiff.tables", "actdiff.kernels",
    "actdiff.engine", "actdiff.sides", "actdiff.compare.stats", "actdiff.compare.aggregate",
    "actdiff.compare.refnoise", "actdiff.compare.search", "actdiff.compare.search_fit",
    "actdiff.compare.search_quant", "actdiff.compare.recover", "actdiff.compare.recover_index",
    "actdiff.compare.parity", "actdiff.report", "actdiff.report.render", "actdiff.report.sections",
    "actdiff.report.shell",
)  # fmt: skip
# Loaded once the warm process serves, one module at a time while no job is waiting to be handed over: the reference's
# and the tokenizers' libraries (the tokenize, dump_reference and export_onnx jobs imported them for 1.5-3 CPU-s
# each) take about 4 s to load, longer than Snakemake takes to start its first jobs, which would run in their own
# processes meanwhile. A job forked before they are all loaded imports the rest itself. torch loads GNU libgomp,
# which reads OMP_WAIT_POLICY as it loads: start() sets it as pin_threads does for a job's own process.
PRELOAD_LATER = (
    "torch", "transformers", "tokenizers", "transformers.models.bert.modeling_bert", "actdiff.models.nomic_moe",
    "actdiff.reference", "actdiff.token_shards", "actdiff.onnxrt.export",
    "tabulate",  # what torch's exit handler (torch._dynamo.utils.dump_compile_times) imports: 37 ms in every job's exit
)  # fmt: skip
# threads a library starts at load that survive a fork by design: pyarrow's jemalloc purges freed pages in the
# background, and jemalloc takes its locks around fork (pthread_atfork) and starts the thread again in a child
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
_HEADER = struct.Struct("!I")
# the signals a job's own process passes on to its fork (SIGKILL cannot be: the fork watches for it instead), and
# which the fork takes back from the warm process's handling (SIGINT: Python's KeyboardInterrupt, as in any job)
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_in_child = False  # set in a job forked by the warm process
# Snakemake's preamble of a script job (snakemake.script.PythonScript): its first line, and the line that ends it
PREAMBLE_START, PREAMBLE_END = "######## snakemake preamble start", "######## snakemake preamble end #########"
STARTUP = "startup"  # beside the socket: the folder start() puts first on the jobs' PYTHONPATH
# Its sitecustomize, which a job's interpreter imports as it starts: a Snakemake script job is handed over there,
# before its preamble (hand_over_early), and any other sitecustomize on the path then runs as it would have
_SITECUSTOMIZE = f"""\
\"\"\"Written by actdiff.warm.start for one workflow run (actdiff.warm.hand_over_early).\"\"\"
import sys


def _hand_over_early():
    import os

    try:  # a regular file only: reading from a pipe (python <(...)) would take the script's first bytes
        if not (sys.argv[0].endswith(".py") and os.path.isfile(sys.argv[0])):
            return
        with open(sys.argv[0], encoding="utf-8") as f:
            if f.read(len({PREAMBLE_START!r})) != {PREAMBLE_START!r}:
                return
        from actdiff.warm import hand_over_early
    except (OSError, ImportError, IndexError, ValueError):
        return
    hand_over_early()


def _next_sitecustomize():
    import importlib.machinery
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_hand_over_early()
_next_sitecustomize()
"""


# ------------------------------------------------------------------------------------------- the job's side
def hand_over() -> None:
    """Run this script job in a fork of the run's warm process and end this process as the job ended there; return
    (the job then runs here) where there is none to hand it to. A Snakemake script adapter calls this first."""
    path = os.environ.get(SOCKET_ENV, "")
    if _in_child or not path or os.environ.get("SLURM_JOB_ID"):
        return
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        replies = conn.makefile("r", encoding="utf-8")
        first = replies.readline().split()
    except OSError:
        return  # gone since it was started, or refusing: the job runs here
    if first[:1] != ["pid"]:
        return
    child = int(first[1])
    for sig in PASSED_ON:
        signal.signal(sig, lambda s, _f: _pass_on(child, s))
    _end_as(replies.readline().split())


def hand_over_early() -> None:
    """:func:`hand_over` as the job's interpreter starts, before Snakemake's preamble (the run's sitecustomize,
    :func:`start`), where the script calls it at its top level after the preamble, as every adapter does first
    thing. The preamble unpickles the job's ``snakemake`` object, which imports Snakemake: 56-87 ms of CPU and of
    latency in the job's own process before it could hand over (bench/README.md), in each of a run's 164 jobs, and
    the fork runs it again anyway, with Snakemake loaded. Anything else, or a script that does not hand over, goes
    on as it would have."""
    try:
        text = Path(sys.argv[0]).read_text(encoding="utf-8")
    except (OSError, ValueError, IndexError):
        return
    preamble, end, body = text.partition(PREAMBLE_END)
    adapter = "\nfrom actdiff.warm import hand_over\n" in body and "\nhand_over()" in body
    if preamble.startswith(PREAMBLE_START) and end and adapter:
        hand_over()


def flush_streams() -> None:
    """Flush stdout and stderr before a process ends without the interpreter's teardown (``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing left to flush
            stream.flush()


def _pass_on(child: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, sig)


def _end_as(status: list[str]) -> None:
    """End this process as the child ended: ``exit N`` or ``signal N``; anything else (the warm process went away
    before it could say) is a failed job."""
    flush_streams()
    if len(status) == 2 and status[0] == "signal":
        sig = int(status[1])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    if len(status) == 2 and status[0] == "exit":
        os._exit(int(status[1]))
    print("actdiff: the warm process ended before this job's status was known", file=sys.stderr)
    os._exit(1)


# ---------------------------------------------------------------------------------------- starting one
def start(argv: list[str]) -> tuple[dict[str, str], int | None]:
    """Start the run's warm process for ``actdiff run``'s Snakemake arguments: (the environment variables its jobs
    find it by, its lifeline), or ({}, None) where none is started (switched off, no job will run, a SLURM job). It
    lives until its lifeline, a pipe's write end left open here, closes: ``actdiff run`` keeps it across its exec of
    Snakemake (Snakemake's jobs do not inherit it), so the warm process ends with Snakemake, however that ends. The
    variables put a sitecustomize first on the jobs' PYTHONPATH (:func:`hand_over_early`); the warm process
    removes it with its socket."""
    if os.environ.get(SWITCH_ENV, "1") == "0" or NO_JOBS_FLAGS & set(argv) or os.environ.get("SLURM_JOB_ID"):
        return {}, None
    import subprocess  # here, not at the top: a job's own process imports this module only to hand itself over
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="actdiff-warm-"))
    path = where / "socket"
    from .workflow_support import set_thread_environment  # (it imports this module)

    read_end, write_end = os.pipe()
    env = dict(os.environ)
    set_thread_environment(env, 1)  # one BLAS thread; libgomp (torch, PRELOAD_LATER) reads OMP_WAIT_POLICY at load
    subprocess.Popen(  # noqa: S603 - our own module, this interpreter
        [sys.executable, "-m", "actdiff.warm", str(path), str(read_end)], pass_fds=(read_end,), env=env,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    os.close(read_end)
    os.set_inheritable(write_end, True)
    (where / STARTUP).mkdir()
    (where / STARTUP / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    python_path = os.pathsep.join(p for p in (str(where / STARTUP), os.environ.get("PYTHONPATH", "")) if p)
    return {SOCKET_ENV: str(path), "PYTHONPATH": python_path}, write_end


def in_child() -> bool:
    """Is this process a job forked by the run's warm process?"""
    return _in_child


# ---------------------------------------------------------------------------------------- the warm process
def serve(path: str, lifeline: int) -> int:
    """Load PRELOAD, then fork a child per job handed over until the lifeline closes (Snakemake has ended), loading
    PRELOAD_LATER whenever no job waits. A library that starts a thread ends the serving: at once where it is one of
    PRELOAD; where it is a later one, the socket goes (the next jobs run in their own processes) and the jobs already
    forked are seen to their end."""
    if not _load(PRELOAD):
        _stop_listening(None, path)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    jobs: dict[int, socket.socket] = {}
    later = list(PRELOAD_LATER)
    try:
        while (listening := listener.fileno() >= 0) or jobs:
            waits = [lifeline, wake_r, *([listener] if listening else [])]
            ready, _, _ = select.select(waits, [], [], 0 if later and listening else None)
            if lifeline in ready:
                return 0
            if wake_r in ready:
                os.read(wake_r, 512)
                _reap(jobs)
            if listener in ready:
                _accept(listener, jobs, (listener.fileno(), lifeline, wake_r, wake_w))
            elif not ready and not _load([later.pop(0)]):
                _stop_listening(listener, path)
        return 1
    finally:
        _stop_listening(listener, path)


def _load(names) -> bool:
    """Import ``names`` (any not installed is left out), then keep what is loaded out of the children's collections
    (they would write to every page of it) and its finalizers out of their exits; False, and why on stderr, where a
    library started a thread."""
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    threads = _other_threads()
    if threads:
        print(f"actdiff warm process: a library started threads ({', '.join(threads)}); not serving, the next jobs "
              "run in their own processes", file=sys.stderr)  # fmt: skip
        return False
    gc.collect()
    for obj in gc.get_objects():  # (the objects not frozen yet)
        if type(obj) is weakref.finalize:
            # this process's objects: a job forked from it would run it at its own exit (torch's 176 operator
            # libraries, 30 ms a job) and, for a temporary directory of this process's, remove it from under us
            obj.atexit = False
    gc.freeze()
    return True


def _stop_listening(listener: socket.socket | None, path: str) -> None:
    """No more jobs handed over: the sitecustomize start() wrote beside the socket, the socket and their directory
    go, so a job finds none and runs in its own process. The socket goes after the sitecustomize: its going is the
    one sign that the warm process has cleaned up (a teardown that checked the sitecustomize once the socket was
    gone found it still there on a loaded machine)."""
    import shutil

    if listener is not None:
        listener.close()
    shutil.rmtree(Path(path).parent / STARTUP, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def _other_threads() -> list[str]:
    """The names of this process's threads but the main one and those FORK_SAFE_THREADS names."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return [n for n in names if n not in FORK_SAFE_THREADS]


def _accept(listener: socket.socket, jobs: dict, own_fds: tuple) -> None:
    conn, _ = listener.accept()
    try:
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (size,) = _HEADER.unpack(head)
        body = b""
        while len(body) < size:
            part = conn.recv(size - len(body))
            if not part:
                raise OSError("the job's process went away")
            body += part
        request = json.loads(body)
    except (OSError, ValueError, struct.error):
        conn.close()
        return
    try:
        pid = os.fork()
    except OSError:  # no process to spare: the job runs in its own (hand_over reads no pid)
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    if pid == 0:
        _child(conn, fds, request, [c for c in jobs.values()], own_fds)
    for fd in fds:
        os.close(fd)
    jobs[pid] = conn
    with contextlib.suppress(OSError):
        conn.sendall(f"pid {pid}\n".encode())


def _reap(jobs: dict) -> None:
    while jobs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = jobs.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)  # -N: ended by signal N
        said = f"signal {-code}" if code < 0 else f"exit {code}"
        with contextlib.suppress(OSError):
            conn.sendall(f"{said}\n".encode())
        conn.close()


def _child(conn: socket.socket, fds: list[int], request: dict, others: list, own_fds: tuple) -> None:
    """The job, in the forked child: the job's streams, directory, environment and command line, then its script;
    never returns."""
    global _in_child
    _in_child = True
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, *PASSED_ON):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        for c in others:
            c.close()
        for fd in own_fds:
            os.close(fd)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _from_environment()
        threading.Thread(target=_die_with_job, args=(conn,), daemon=True, name="actdiff-warm-lifeline").start()
        sys.argv = list(request["argv"])
        import runpy

        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the job's traceback, as its own process would print it
        import traceback

        traceback.print_exc()
    finally:
        flush_streams()
        os._exit(code)


def _from_environment() -> None:
    """What the loaded libraries took from the warm process's environment, taken again from the job's: the kernel
    path (ACTDIFF_KERNELS_ISA, checked as at import)."""
    kernels = sys.modules.get("actdiff.kernels")
    if kernels is not None:
        kernels.forced_isa()
        kernels.lib.ak_set_isa(kernels.lib.AK_ISA_AUTO)


def _die_with_job(conn: socket.socket) -> None:
    """Kill this child when the job's process is gone (the connection's other end closed: it was killed)."""
    with contextlib.suppress(OSError):
        while conn.recv(64):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # run as actdiff.warm, not __main__: a child's _in_child is the module its jobs import
    from actdiff import warm

    sys.exit(warm.serve(sys.argv[1], int(sys.argv[2])))
