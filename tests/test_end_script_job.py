"""A finished Snakemake script job ends without the interpreter's teardown (actdiff.workflow_support.end_script_job):
what the job promises is still done (its output, its log flushed and closed, its temporary directories removed,
its exit functions run, with every object frozen for the collection one may ask for, its exit status 0), and
nothing but a script job's main thread ends that way."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, gc, logging, sys, tempfile, threading, time
sys.path.insert(0, {src!r})
from actdiff.workflow_support import end_script_job, setup_logging

setup_logging(snakemake.log[0])
tmp = tempfile.TemporaryDirectory(prefix="actdiff-end-job-")  # removed by its finaliser at exit
open(snakemake.output.tmpdir, "w").write(tmp.name)
if snakemake.wildcards.kind == "thread":  # a worker still running: the process must wait for it as usual
    threading.Thread(target=lambda: (time.sleep(0.5), open(snakemake.output.out, "a").write("worker\\n"))).start()
# what an exit function finds (IPython's asks for a full collection): every object frozen where the job ends early
atexit.register(lambda: open(snakemake.output.out, "a").write(f"frozen {{gc.get_freeze_count() > 0}}\\n"))
logging.getLogger("test").info("last line of the log")
print("stdout line", end="")  # unflushed until the exit flushes it
open(snakemake.output.out, "a").write("main\\n")
end_script_job()
if snakemake.wildcards.kind == "fast":
    raise SystemExit("end_script_job returned in a script job")
"""

SNAKEFILE = """
rule all:
    input: expand("out/{{kind}}.txt", kind=["fast", "thread"])
rule job:
    output: out="out/{{kind}}.txt", tmpdir="out/{{kind}}.tmpdir"
    log: "out/{{kind}}.log"
    script: "job.py"
"""


def test_script_job_ends_with_everything_done(tmp_path):
    (tmp_path / "job.py").write_text(SCRIPT.format(src=str(ROOT / "src")))
    (tmp_path / "Snakefile").write_text(textwrap.dedent(SNAKEFILE.format()))
    smk = Path(sys.executable).parent / "snakemake"
    p = subprocess.run([str(smk), "--cores", "2", "--directory", str(tmp_path), "-s", str(tmp_path / "Snakefile")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "fast.txt").read_text() == "main\nfrozen True\n"
    assert (out / "thread.txt").read_text() == "main\nworker\nfrozen False\n"  # the worker finished first
    for kind in ("fast", "thread"):
        assert "last line of the log" in (out / f"{kind}.log").read_text()  # logging flushed and closed
        assert not Path((out / f"{kind}.tmpdir").read_text()).exists()  # the finaliser ran
    assert "stdout line" in p.stdout + p.stderr


def test_outside_a_script_job_it_returns():
    """In this process (pytest, no Snakemake preamble in __main__) the call is a no-op."""
    from actdiff.workflow_support import end_script_job

    end_script_job()
    assert threading.main_thread().is_alive()
