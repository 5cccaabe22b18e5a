"""Extra cost of the statistics stage (actdiff.pipeline.compute_stats) of one tree against another.

For every (model, side, variant, shard) dump present under a results directory (kept with
keep_activations=true), compute_stats runs once with the "before" tree and once with the "after" tree, each in a
fresh subprocess with PYTHONPATH=<tree>/src and one BLAS thread (as rule compute_stats pins), interleaved
before/after per item so machine load hits both alike. The arguments are those the workflow passes for the
config (each tree reads it with its own schema; a tree whose compute_stats takes ``search`` gets the
stats.search_* keys). Seconds are the call itself (imports excluded); the search's own seconds come from the
after run's INFO log line "search: N node(s) in X CPU s" (0 for a tree that searches once per run, in
aggregation, actdiff.compare.search_run). Outputs go to temp dirs.

    python bench/stats_cost.py --before 96d16c1 --results /tmp/cost/results [--only 'tiny-nomic-moe/*']

``--before`` is a tree or a git revision (checked out as a temporary worktree of the after tree's repository,
with the after tree's compiled kernels copied in); ``--after`` defaults to the current git working tree.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEARCH_RE = re.compile(r"search: (\d+) node\(s\) in ([0-9.]+) (?:CPU )?s")

WORKER = r"""
import inspect, json, logging, sys, time
from actdiff.config import load_config
from actdiff.pipeline import compute_stats
from actdiff.tables import SHARD_TABLES
from actdiff.workflow_support import pin_threads
a = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
pin_threads(1)
cfg = load_config(a["config"])
st = cfg["stats"]
kw = dict(budgets=dict(cfg["budgets"]), worst_m=st["worst_m"], embedding_sample=st["embedding_sample"],
          fault_aliases=dict(cfg["fault_aliases"]), diagnose_all_failing=st["diagnose_all_failing"])
if "search" in inspect.signature(compute_stats).parameters:
    kw["search"] = {k: st[k] for k in ("search_seconds", "search_prompts", "search_nodes")}
outputs = {t: f"{a['out']}/{t}.parquet" for t in SHARD_TABLES}
t0 = time.perf_counter()
compute_stats(a["model_json"], a["ref"], a["eng"], a["side"], a["variant"], a["shard"], outputs, **kw)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def find_items(results: Path, only: str | None) -> list[dict]:
    """Every engine-side dump with its reference dump: results/{model}/{side}/{variant}/activations/shard-N.h5."""
    items = []
    for eng in sorted(results.glob("*/*/*/activations/shard-*.h5")):
        model, side, variant = eng.parts[-5:-2]
        shard = int(eng.stem.split("-")[1])
        ref = results / model / "reference" / "fp32" / "activations" / eng.name
        key = f"{model}/{side}/{variant}/shard-{shard}"
        if side == "reference" or not ref.exists() or (only and not fnmatch.fnmatch(key, only)):
            continue
        items.append(
            dict(
                key=key,
                model_json=str(results / model / "model.json"),
                ref=str(ref),
                eng=str(eng),
                side=side,
                variant=variant,
                shard=shard,
            )
        )
    return items


def before_tree(before: str, after: Path, tmp: Path) -> Path:
    """``before`` as a tree: a directory as is, else a revision checked out as a temporary detached worktree."""
    if Path(before, "src", "actdiff").is_dir():
        return Path(before).resolve()
    wt = tmp / "before"
    subprocess.run(
        ["git", "-C", str(after), "worktree", "add", "--detach", str(wt), before], check=True, stdout=subprocess.DEVNULL
    )
    for so in (after / "src").rglob("*.so"):  # compiled kernels are build outputs, not in git
        shutil.copy2(so, wt / so.relative_to(after))
    return wt


def snapshot(after: Path, config: Path, tmp: Path) -> tuple[Path, str, str]:
    """A copy of the after tree's src/ and of the config, so edits made to the tree during the run do not mix
    into it; with a label: the tree's HEAD, "+dirty" when src/ has uncommitted changes."""
    dst = tmp / "after"
    shutil.copytree(after / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(config, tmp / "config.yaml")
    git = ["git", "-C", str(after)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    return dst, str(tmp / "config.yaml"), f"{after} @ {head or '?'}{'+dirty' if dirty else ''}"


def run_one(tree: Path, item: dict, config: str, out: Path) -> dict:
    """One compute_stats call in a subprocess on ``tree``: its seconds, search seconds, 1-min load before."""
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    args = json.dumps(dict(item, config=config, out=str(out)))
    load = os.getloadavg()[0]
    p = subprocess.run([sys.executable, "-c", WORKER, args], env=env, capture_output=True, text=True)
    (out / "log.txt").write_text(p.stderr)
    if p.returncode != 0:
        sys.exit(f"{item['key']} on {tree} failed:\n{p.stderr[-3000:]}")
    m = SEARCH_RE.search(p.stderr)
    return dict(
        seconds=json.loads(p.stdout.strip().splitlines()[-1])["seconds"],
        load=load,
        search=float(m.group(2)) if m else 0.0,
        search_nodes=int(m.group(1)) if m else 0,
    )


def report(rows: list[tuple[str, dict, dict]]) -> None:
    w = max(len(k) for k, _, _ in rows)
    print(f"{'item':{w}s} {'old s':>8s} {'new s':>8s} {'ratio':>6s} {'search s':>8s} {'nodes':>5s} {'load1':>5s}")
    for key, o, n in rows:
        print(
            f"{key:{w}s} {o['seconds']:8.2f} {n['seconds']:8.2f} {n['seconds'] / o['seconds']:6.2f} "
            f"{n['search']:8.2f} {n['search_nodes']:5d} {(o['load'] + n['load']) / 2:5.2f}"
        )
    old = sum(o["seconds"] for _, o, _ in rows)
    new = sum(n["seconds"] for _, _, n in rows)
    search = sum(n["search"] for _, _, n in rows)
    loads = [r["load"] for _, o, n in rows for r in (o, n)]
    print(f"{'TOTAL':{w}s} {old:8.2f} {new:8.2f} {new / old:6.2f} {search:8.2f}")
    print(
        f"extra {new - old:.2f} s (+{100 * (new / old - 1):.1f}%); search {search:.2f} s = "
        f"{100 * search / new:.1f}% of new; 1-min load avg mean {sum(loads) / len(loads):.2f} max {max(loads):.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="tree directory or git revision")
    ap.add_argument("--after", help="tree directory (default: the current git working tree)")
    ap.add_argument("--results", required=True, type=Path, help="results dir with kept activation dumps")
    ap.add_argument("--only", help="glob over model/side/variant/shard-N")
    ap.add_argument("--config", help="run config (default: <after>/config/config.yaml)")
    a = ap.parse_args(argv)
    after = Path(a.after or subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    config = Path(a.config or after / "config" / "config.yaml").resolve()
    items = find_items(a.results.resolve(), a.only)
    if not items:
        sys.exit(f"no engine dumps with a reference dump under {a.results}")
    with tempfile.TemporaryDirectory(prefix="stats_cost-") as tmp:
        tmp = Path(tmp)
        new, config, label = snapshot(after, config, tmp)
        before = before_tree(a.before, after, tmp)
        try:
            rows = []
            for i, item in enumerate(items):
                o = run_one(before, item, config, tmp / f"{i}-old")
                n = run_one(new, item, config, tmp / f"{i}-new")
                rows.append((item["key"], o, n))
                print(f"{item['key']}: old {o['seconds']:.2f} s, new {n['seconds']:.2f} s", file=sys.stderr)
        finally:
            if before == tmp / "before":
                subprocess.run(["git", "-C", str(after), "worktree", "remove", "--force", str(before)], check=False)
    print(f"before {a.before}  after {label} (snapshot)")
    report(rows)


if __name__ == "__main__":
    main()
