"""actdiff.heap: with the policy applied, a forward-like round (40 arrays of 4 MiB alive at once, then all
freed) reuses the last round's pages; without it glibc trims the freed heap top and maps fresh memory, so every
round faults its 160 MiB in again (measured: 102k faults over 5 rounds, 0 with the policy). Each case runs in a
fresh process: the policy is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np
from actdiff.heap import reuse_freed_memory, reuse_freed_memory_for_job
mode, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
apply = {"policy": reuse_freed_memory, "job": reuse_freed_memory_for_job}.get(mode)
ok = apply() if apply else None
assert apply is None or apply() == ok  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    keep = [np.ones(size // 4, np.float32) for _ in range(count)]
    del keep
round_()  # the first round faults its pages in either way
f0 = faults()
for _ in range(5):
    round_()
print(json.dumps({"applied": ok, "faults": faults() - f0}))
"""

ROUND_PAGES = 40 * (4 << 20) // 4096  # 40960: one round's arrays in 4 KiB pages
LARGE = (3, 48 << 20)  # a round of large blocks: 3 of 48 MiB, above glibc's largest mmap threshold (32 MiB)
LARGE_PAGES = LARGE[0] * LARGE[1] // 4096  # 36864


def _faults(mode: str, count: int = 40, size: int = 4 << 20) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(size), str(count)], capture_output=True, text=True,
                       check=True)  # fmt: skip
    return json.loads(r.stdout)


def test_freed_memory_is_reused_without_page_faults():
    out = _faults("policy")
    assert out["applied"], "glibc's mallopt refused the policy"
    # reused pages fault none; numpy's and the interpreter's own small allocations: bounded by 1 % of one round
    assert out["faults"] < ROUND_PAGES // 100, out


def test_without_the_policy_the_rounds_fault_their_pages_in():
    """The control: the default malloc maps each round afresh (at least one round's pages over five rounds; the
    kernel may map some of them as huge pages, so not all 5 x 40960), so the test above measures the policy."""
    assert _faults("none")["faults"] > ROUND_PAGES, "the default already reuses freed pages: the policy test is moot"


def test_a_job_reuses_blocks_above_the_mmap_threshold():
    """A workflow job's policy (reuse_freed_memory_for_job) takes blocks above 32 MiB from the heap too, so a
    round of 48 MiB arrays reuses the last round's pages; the engine's policy (blocks up to 32 MiB) maps them
    afresh every round (measured: 8040 faults over 5 rounds against 0; numpy asks for transparent huge pages on
    large arrays, so most of a fresh block faults in 2 MiB at a time: 184k faults with that turned off)."""
    job = _faults("job", *LARGE)
    assert job["applied"], "glibc's mallopt refused M_MMAP_MAX"
    assert job["faults"] < LARGE_PAGES // 100, job
    # the control: with the 32 MiB limit alone each round faults its blocks in again, at least 5 x 144 huge pages
    # (or 5 x 36864 small ones), so it fails the bound the job's policy meets
    control = _faults("policy", *LARGE)["faults"]
    assert control > LARGE_PAGES // 100, f"blocks above 32 MiB were reused without the job policy ({control} faults)"


def test_every_workflow_job_applies_the_policy():
    """actdiff.workflow_support.run (every rule's adapter) applies the job's policy before the rule's function
    runs: the statistics' float64 temporaries and the dumps' read windows were mapped afresh otherwise."""
    child = r"""
import json, types
import actdiff.heap as heap
from actdiff.workflow_support import run
job = types.SimpleNamespace(log=[], threads=1, rule="probe", wildcards={})
print(json.dumps({"before": heap._applied_for_job, "during": run(job, lambda: heap._applied_for_job)}))
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"before": None, "during": True}, out
