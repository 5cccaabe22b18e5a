"""Command-line entry point: ``actdiff <command>``.

Commands:
  run [SNAKEMAKE ARGS]                     run the workflow: checks every --configfile, then runs snakemake
  nodes MODEL_DIR_OR_CONFIG [--markdown]   print the canonical node graph of a model
  make-tiny OUT_DIR [--seed N]             generate the embedded tiny-nomic-moe model
  validate-config CONFIG.yaml              validate a workflow config against the schema
  inspect DUMP.h5                          summarise an activation dump
  check [RESULTS] [--baseline DIR]         CI gate over a run's statistics (exit 1 on a breach)
  import SRC --mapping M.yaml ...          turn another engine's per-node dumps into actdiff's HDF5
  report RESULTS [--baseline DIR]          render a finished run's reports (before/after against a baseline)
  publish RESULTS SITE_DIR                 the rendered reports as a static site (index, reports, manifest)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ActdiffError


def _graph(target: str):
    from .nodes import build_graph, graph_for_model_dir

    p = Path(target)
    if p.is_dir():
        return graph_for_model_dir(p)
    return build_graph(json.loads(p.read_text(encoding="utf-8")), str(p))


def nodes_markdown(graph, hf_prefix: str = "") -> str:
    sym = graph.dims.symbols()
    lines = [
        "| # | node | op | inputs | shape | kind | reference tap (module, hook) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in graph:
        dims = ", ".join(s if s in ("T", "1") else f"{s}={sym[s]}" for s in n.shape)
        tap = f"`{hf_prefix}{n.tap[0]}` ({'forward output' if n.tap[1] == 'output' else 'forward input'})"
        inputs = ", ".join(f"`{i}`" for i in n.inputs)
        lines.append(f"| {n.index} | `{n.name}` | {n.op} | {inputs} | [{dims}] | {n.kind} | {tap} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # every other argument is Snakemake's, so argparse must not see them
        from .launch import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["check"]:
        from .compare.check import main as check_main

        return check_main(argv[1:])
    if argv[:1] == ["import"]:
        from .sides.imported import main as import_main

        try:
            return import_main(argv[1:]) or 0
        except ActdiffError as e:
            print(f"actdiff: {e}", file=sys.stderr)
            return 1
    if argv[:1] in (["publish"], ["report"]):
        from .report.command import main as report_main
        from .report.publish import main as publish_main

        try:
            return (publish_main if argv[0] == "publish" else report_main)(argv[1:])
        except ActdiffError as e:
            print(f"actdiff: {e}", file=sys.stderr)
            return 1
    ap = argparse.ArgumentParser(prog="actdiff", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("nodes", help="print the canonical node graph")
    p.add_argument("target", help="model directory or config.json")
    p.add_argument("--markdown", action="store_true")
    p = sub.add_parser("make-tiny", help="generate tiny-nomic-moe")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="default: the packaged corpus (actdiff/data/tokenizer_training.txt)")
    p = sub.add_parser("validate-config", help="validate a workflow config")
    p.add_argument("config")
    p.add_argument("--schema", default=None, help="default: the packaged schema (actdiff/data/config.schema.yaml)")
    p = sub.add_parser("inspect", help="summarise an activation dump")
    p.add_argument("dump")
    sub.add_parser("run", help="run the workflow (snakemake arguments; config files checked first)")
    sub.add_parser("check", help="CI gate over a run's statistics (see actdiff check --help)")
    sub.add_parser("import", help="import another engine's dumps (see actdiff import --help)")
    sub.add_parser("report", help="render a run's reports, e.g. against a baseline (see actdiff report --help)")
    sub.add_parser("publish", help="the rendered reports as a static site (see actdiff publish --help)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "nodes":
            g = _graph(args.target)
            print(nodes_markdown(g) if args.markdown else g.describe())
        elif args.cmd == "make-tiny":
            from .models.released import released_config
            from .models.tiny import TRAINING_TEXT, generate_tiny_model

            generate_tiny_model(args.out_dir, args.text or TRAINING_TEXT, released_config(), seed=args.seed)
            print(f"wrote {args.out_dir}")
        elif args.cmd == "validate-config":
            from .config import load_config

            load_config(args.config, args.schema)
            print(f"{args.config}: valid")
        elif args.cmd == "inspect":
            from .h5io import ActivationReader

            with ActivationReader(args.dump) as r:
                print(
                    f"{args.dump}: model={r.attrs.get('model')} side={r.attrs.get('side')} "
                    f"variant={r.attrs.get('variant')} prompts={len(r.prompt_ids)} tokens={int(r.offsets[-1])} "
                    f"nodes={len(r.node_names)}"
                )
    except ActdiffError as e:
        print(f"actdiff: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
