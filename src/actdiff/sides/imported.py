"""Import another engine's activation dumps into actdiff's HDF5 layout (docs/formats.md, docs/mapping.md).

Input folder layouts (detected per prompt):

- ``<src>/<prompt_id>/<name>.npy``: one ``.npy`` per external tensor; the tensor name is the path below
  the prompt folder without ``.npy`` (``blk.0.attn_qkv.npy`` -> ``blk.0.attn_qkv``; sub-folders give
  ``a/b``);
- ``<src>/<prompt_id>.safetensors``: tensor name -> array.

Prompts are taken in the order of the tokens Parquet (``prompt_id``; ``reference_ids`` gives T per
prompt). The alignment is resolved against the tensor names of the first prompt; every prompt must then
hold the tensors of every matched node. The mapping (actdiff.sides.mapping) turns each prompt's tensors
into canonical arrays, which are written with :class:`actdiff.h5io.ActivationWriter`.

Graph nodes without a source are an error listing them all, unless ``allow_missing=True``: then they are
written as NaN (``-1`` for integer expert ids, which cannot hold NaN), listed in the file attribute
``missing_nodes`` (JSON list) and named in a warning. The file attribute ``alignment`` (JSON) records the
matched specs and the unmatched names on both sides; ``import_dump`` also returns that report and, with
``report_json=``, writes it to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ActdiffError, DumpError
from ..nodes import graph_for_model_dir
from .mapping import Mapping, alignment_summary, load_mapping

log = logging.getLogger(__name__)

NPY = ".npy"
SAFETENSORS = ".safetensors"


@dataclass
class PromptDump:
    """The external tensors of one prompt, in one of the two layouts."""

    prompt_id: str
    path: Path
    layout: str  # "npy" | "safetensors"

    def names(self) -> list[str]:
        if self.layout == "npy":
            return sorted(p.relative_to(self.path).as_posix()[: -len(NPY)] for p in self.path.rglob("*" + NPY))
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                return sorted(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
            raise DumpError(f"{self.path}: prompt {self.prompt_id!r}: not a readable safetensors file ({e})") from None

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.layout == "npy":
            for n in names:
                p = self.path / (n + NPY)
                try:
                    out[n] = np.load(p, allow_pickle=False)
                except (OSError, ValueError, EOFError) as e:
                    raise DumpError(f"{p}: prompt {self.prompt_id!r}: cannot read tensor {n!r} ({e})") from None
            return out
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                for n in names:
                    out[n] = f.get_tensor(n)
        except Exception as e:
            raise DumpError(f"{self.path}: prompt {self.prompt_id!r}: cannot read tensor(s) ({e})") from None
        return out


def find_prompt_dump(src_dir: Path, prompt_id: str) -> PromptDump:
    folder = src_dir / prompt_id
    st = src_dir / (prompt_id + SAFETENSORS)
    if folder.is_dir() and st.is_file():
        raise DumpError(f"{src_dir}: prompt {prompt_id!r} has both {folder}/ and {st}; keep only one")
    if folder.is_dir():
        return PromptDump(prompt_id, folder, "npy")
    if st.is_file():
        return PromptDump(prompt_id, st, "safetensors")
    raise DumpError(
        f"{src_dir}: no dump for prompt {prompt_id!r}: expected a folder {folder}/ of .npy files or a file {st}"
    )


def prompt_ids_in(src_dir: Path) -> set[str]:
    """Prompt ids a dump folder holds (sub-folders and ``.safetensors`` files)."""
    out = {p.name for p in src_dir.iterdir() if p.is_dir()}
    return out | {p.name[: -len(SAFETENSORS)] for p in src_dir.glob("*" + SAFETENSORS)}


def check_prompts(src_dir: Path, tokens: str | Path, prompts: list[tuple[str, int]], exact: bool) -> None:
    """Every prompt of the tokens shard must have a dump; with ``exact`` (a folder made for this shard, such
    as a command's output) the folder must hold no other prompt either."""
    have, want = prompt_ids_in(src_dir), [p for p, _ in prompts]
    missing = [p for p in want if p not in have]
    extra = sorted(have - set(want)) if exact else []
    if missing or extra:
        what = []
        if missing:
            p0 = missing[0]
            what.append(
                f"no dump for {len(missing)} prompt(s) of {tokens}: {', '.join(map(repr, missing[:10]))} "
                f"(expected a folder {src_dir / p0}/ of .npy files or a file {src_dir / p0}{SAFETENSORS})"
            )
        if extra:
            what.append(f"{len(extra)} prompt(s) not in {tokens}: {', '.join(map(repr, extra[:10]))}")
        raise DumpError(
            f"{src_dir}: " + "; ".join(what) + ". The engine must run on exactly the prompts and token ids of the "
            "tokens shard (rule tokenize writes them: snakemake results/<model>/tokens/shard-N.parquet)"
        )


def read_tokens(tokens_parquet: str | Path) -> list[tuple[str, int]]:
    """(prompt_id, T) in file order, T = len(reference_ids)."""
    import pyarrow.parquet as pq

    path = Path(tokens_parquet)
    if not path.is_file():
        raise DumpError(f"{path}: tokens file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a corrupted file
        raise DumpError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("prompt_id", "reference_ids") if c not in table.column_names]
    if missing:
        raise DumpError(f"{path}: missing column(s) {missing} (a tokens file has prompt_id and reference_ids)")
    ids = table.column("prompt_id").to_pylist()
    refs = table.column("reference_ids").to_pylist()
    out, seen = [], set()
    for pid, r in zip(ids, refs, strict=True):
        if not isinstance(pid, str) or not pid:
            raise DumpError(f"{path}: bad prompt_id {pid!r}")
        if pid in seen:
            raise DumpError(f"{path}: prompt_id {pid!r} appears twice")
        if not r:
            raise DumpError(f"{path}: prompt {pid!r} has no reference_ids")
        seen.add(pid)
        out.append((pid, len(r)))
    return out


class ImportedSide:
    """Another engine's per-prompt dumps, aligned by a mapping file: a side whose forward reads files. The
    alignment is resolved against the tensor names of the first prompt; every prompt must then hold the
    tensors of every matched node."""

    records_input_ids = False  # the ids the external engine ran on are not known

    def __init__(self, src: Path, mapping: Mapping, graph, prompts: list[tuple[str, int]], name: str, variant: str,
                 allow_missing: bool, engine: dict | None = None, tokens: str | Path = "the tokens file"):  # fmt: skip
        self.src, self.mapping, self.graph, self.name, self.variant = src, mapping, graph, name, variant
        self.engine, self.tokens = engine or {}, tokens
        self.first = find_prompt_dump(src, prompts[0][0]) if prompts else None
        self.alignment = mapping.resolve(self.first.names() if self.first else [])
        self.missing_nodes = tuple(self.alignment.unmatched_canonical) if prompts else ()
        if self.missing_nodes:
            self._missing(prompts[0][0], allow_missing)
        self.needed = sorted({s for spec in self.alignment.matched.values() for s in spec.external_names})
        self.layouts: dict[str, int] = {}

    def _missing(self, first_pid: str, allow_missing: bool) -> None:
        a = self.alignment
        detail = "; ".join(
            f"{n} (external tensor(s) {', '.join(m + a.suggestions.get(m, '') for m in a.missing_sources[n])} absent)"
            if n in a.missing_sources
            else f"{n} (no entry)"
            for n in self.missing_nodes
        )  # fmt: skip
        msg = (
            f"{self.src}: {len(self.missing_nodes)} graph node(s) have no source in {self.mapping.source} for prompt "
            f"{first_pid!r}: {detail}"
        )
        if not allow_missing:
            raise DumpError(msg + "; add them to the mapping, or pass allow_missing (--allow-missing) to write NaN")
        log.warning("%s; writing NaN for them (missing_nodes attribute)", msg)

    def provenance(self) -> dict:
        return {
            "impl": "import",
            "engine": self.mapping.engine or self.name,
            "engine_kind": self.engine.get("kind", "import"),
            "engine_command": self.engine.get("command") or "",
            "source_dir": str(self.src.resolve()),
            "mapping": self.mapping.source if self.mapping.source else "<identity>",
            "dtypes": json.dumps({"activations": "float32", "indices": "int64"}),
            "missing_nodes": json.dumps(list(self.missing_nodes)),
            "alignment": json.dumps(self.alignment.to_dict(), separators=(",", ":")),
        }

    def forward(self, items):
        matched = list(self.alignment.matched)
        for k, (pid, ids) in enumerate(items):
            dump = self.first if k == 0 else find_prompt_dump(self.src, pid)
            self.layouts[dump.layout] = self.layouts.get(dump.layout, 0) + 1
            absent = sorted(set(self.needed) - set(dump.names())) if k else []
            if absent:
                raise DumpError(
                    f"{dump.path}: prompt {pid!r} lacks external tensor(s) {absent} that the first prompt "
                    f"{items[0][0]!r} has and the mapping uses"
                )
            try:
                yield pid, self.mapping.apply(dump.load(self.needed), len(ids), nodes=matched)
            except DumpError as e:
                raise DumpError(
                    f"{dump.path}: prompt {pid!r}: {e}. {self.tokens} gives this prompt T={len(ids)} tokens "
                    "(reference_ids): a token-axis mismatch means the engine did not run on those ids"
                ) from None

    def close(self) -> None:
        pass


def shard_of_paths(tokens: str | Path, out: str | Path | None = None) -> int:
    """The shard a tokens file belongs to (``.../shard-N.parquet``); an output path that names another shard
    is an error. A tokens file outside the layout is shard 0 unless ``out`` names one."""
    from ..layout import Layout

    def shard(p) -> int | None:
        try:
            return Layout().shard_of(str(Path(p).resolve()))
        except ValueError:
            return None

    s_tok, s_out = shard(tokens), shard(out) if out is not None else None
    if s_tok is not None and s_out is not None and s_tok != s_out:
        raise DumpError(f"{out}: names shard {s_out} but the tokens file {tokens} is shard {s_tok}")
    return s_tok if s_tok is not None else (s_out or 0)


def _record(imported: ImportedSide, mapping_path, prompts, engine: dict | None) -> dict:
    """The import report: source, mapping (with its sha256), engine spec, counts and the alignment."""
    import hashlib

    sha = hashlib.sha256(Path(mapping_path).read_bytes()).hexdigest() if mapping_path is not None else None
    return {
        "engine_spec": engine or {},
        "source_dir": str(imported.src.resolve()),
        "mapping": imported.mapping.source if mapping_path is not None else None,
        "mapping_sha256": sha,
        "engine": imported.mapping.engine,
        "n_prompts": len(prompts),
        "n_tokens": int(sum(t for _, t in prompts)),
        "layouts": imported.layouts,
        "alignment": imported.alignment.to_dict(),
        "missing_nodes": list(imported.missing_nodes),
    }


def import_dump(
    src_dir: str | Path,
    mapping_path: str | Path | None,
    model_dir: str | Path,
    tokens_parquet: str | Path,
    out_h5: str | Path,
    side: str = "external",
    variant: str = "fp32",
    shard: int | None = None,
    allow_missing: bool = False,
    report_json: str | Path | None = None,
    model_name: str | None = None,
    engine: dict | None = None,
    exact_prompts: bool = False,
    compression: str = "none",
) -> dict:
    """Convert ``src_dir`` (another engine's per-prompt dumps) into an actdiff dump at ``out_h5``.

    ``mapping_path`` None aligns by canonical name. The shard comes from the tokens file's name unless given.
    Every prompt of the tokens file must have a dump (``exact_prompts``: and no other). ``engine`` (the
    config's engine entry) is recorded. Returns the report (also stored as the ``alignment`` attribute and,
    with ``report_json``, written there): source, mapping, counts, alignment and ``missing_nodes``.
    """
    from ..atomic import write_json_atomic
    from ..models.loading import weights_hash
    from .dump import dump_shard

    src = Path(src_dir)
    if not src.is_dir():
        raise DumpError(f"{src}: source folder of the external dump not found")
    shard = shard_of_paths(tokens_parquet, out_h5) if shard is None else shard
    model_dir = Path(model_dir)
    graph = graph_for_model_dir(model_dir)
    mapping = load_mapping(mapping_path, graph) if mapping_path is not None else Mapping.identity(graph)
    prompts = read_tokens(tokens_parquet)
    if not prompts:
        log.warning("%s: no prompts; writing an empty dump", tokens_parquet)
    check_prompts(src, tokens_parquet, prompts, exact_prompts)
    imported = ImportedSide(src, mapping, graph, prompts, side, variant, allow_missing, engine, tokens_parquet)
    model = {
        "model": model_name or model_dir.name,
        "weights_sha256": weights_hash(model_dir) if (model_dir / "model.safetensors").is_file() else None,
        "model_dir": str(model_dir.resolve()),
    }
    # T per prompt from the reference ids; the ids themselves are not recorded (records_input_ids)
    dump_shard(imported, model, [(pid, [0] * T) for pid, T in prompts], out_h5, shard, compression)
    report = _record(imported, mapping_path, prompts, engine)
    if report_json is not None:
        write_json_atomic(report_json, report)
    log.info(
        "imported %d prompts (%d tokens) of shard %d from %s: %d/%d nodes matched, %d missing, %d unused external",
        len(prompts), report["n_tokens"], shard, src, len(imported.alignment.matched), len(graph),
        len(imported.missing_nodes), len(imported.alignment.unused_external),
    )  # fmt: skip
    return report


def tokens_files(arg: str | Path) -> list[Path]:
    """The tokens shards named by ``arg``: a Parquet file, a folder of ``shard-N.parquet`` or a glob."""
    import glob

    p = Path(arg)
    found = sorted(p.glob("shard-*.parquet")) if p.is_dir() else [Path(x) for x in sorted(glob.glob(str(arg)))]
    if not found:
        raise DumpError(
            f"{arg}: no tokens file (a tokens shard, a folder of shard-N.parquet or a glob); the workflow's "
            "tokenize step writes them: snakemake results/{model}/tokens/shard-0.parquet --configfile CONFIG"
        )
    return found


def import_shards(src: str, tokens: str, out: str | None, model_dir: str, side: str, variant: str,
                  model: str | None = None, **kwargs) -> list[tuple[str, dict]]:  # fmt: skip
    """Import every tokens shard named by ``tokens``: SRC may hold ``{shard}`` (a folder per shard, whose
    prompts must then equal the shard's); each dump goes to ``out`` (one shard only) or to the Layout's
    activations path of (model, side, variant, shard) beside the tokens folder."""
    from ..layout import Layout

    files = tokens_files(tokens)
    if out is not None and len(files) > 1:
        raise DumpError(f"--out {out} takes one tokens shard, {tokens} names {len(files)}; leave --out out")
    done = []
    for f in files:
        shard = shard_of_paths(f, out)
        dest = out
        if dest is None:
            where = Layout.of_tokens(f)
            if where is None:
                raise DumpError(f"{f} is not results/<model>/tokens/shard-N.parquet; give --out")
            dest = where[0].activations(model or where[1], side, variant, shard)
        folder = src.format(shard=shard) if "{shard}" in src else src
        rep = import_dump(folder, model_dir=model_dir, tokens_parquet=f, out_h5=dest, side=side, variant=variant,
                          shard=shard, model_name=model, exact_prompts="{shard}" in src, **kwargs)  # fmt: skip
        done.append((str(dest), rep))
    return done


def build_parser(prog: str = "actdiff import") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Import another engine's per-prompt activation dumps "
        "(<src>/<prompt_id>/<name>.npy or <src>/<prompt_id>.safetensors) into actdiff's "
        "HDF5 layout, aligning tensor names with a mapping file (docs/mapping.md), one dump per tokens shard.",
    )
    ap.add_argument("src", help="folder of per-prompt dumps; may contain {shard} (a folder per shard)")
    ap.add_argument("--mapping", help="mapping YAML (default: tensors are named by canonical node name)")
    ap.add_argument("--model-dir", required=True, help="model directory (config.json gives the node graph)")
    ap.add_argument(
        "--tokens",
        required=True,
        help="tokens shard(s): results/<model>/tokens/ (every shard), one shard-N.parquet, or a glob; the "
        "workflow's tokenize step writes them (snakemake results/<model>/tokens/shard-0.parquet)",
    )
    ap.add_argument("--out", help="output HDF5 (one shard only; default: the layout's activations path)")
    ap.add_argument("--side", default="external", help="side (engine) name in paths and the dump (default: external)")
    ap.add_argument("--variant", default="fp32", help="variant recorded in the dump (default: fp32)")
    ap.add_argument("--model", help="model name (default: from the tokens path results/<model>/tokens/)")
    ap.add_argument("--allow-missing", action="store_true", help="write NaN for nodes without a source")
    ap.add_argument("--report", help="also write the alignment report to this JSON file (one shard only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``actdiff import SRC --mapping M.yaml --model-dir D --tokens results/<model>/tokens/ [...]``."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        done = import_shards(args.src, args.tokens, args.out, args.model_dir, args.side, args.variant, args.model,
                             mapping_path=args.mapping, allow_missing=args.allow_missing,
                             report_json=args.report)  # fmt: skip
    except ActdiffError as e:
        print(f"actdiff: {e}", file=sys.stderr)
        return 1
    for out, rep in done:
        print(
            f"{out}: {rep['n_prompts']} prompts, {rep['n_tokens']} tokens from {rep['source_dir']} "
            f"(mapping: {rep['mapping'] or 'canonical names'})"
        )
    print(alignment_summary(done[-1][1]["alignment"]))
    if done[-1][1]["missing_nodes"]:
        print(f"written as NaN (missing_nodes): {len(done[-1][1]['missing_nodes'])} node(s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
