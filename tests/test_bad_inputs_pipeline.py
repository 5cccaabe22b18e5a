"""Bad inputs that only show through the real pipeline (issue 15, the bad-input tour): a shard the hash gives
no prompt, a model replaced in place after a finished run. Small configs: the tiny model, fp32, our engine."""

from __future__ import annotations

import json
import os
import textwrap

import pandas as pd
from helpers import ensure_tiny_model, snakemake

# p1 and p3 both hash to shard 1 of 2 (actdiff.prompts.shard_of), so shard 0 gets no prompt
TWO_PROMPTS = "prompt_id\ttext\np1\thello world\np3\tx = 1 + 2\n"


def _tiny_config(tmp_path, model_source: str, shards: int = 2, extra: str = "") -> str:
    sheet = tmp_path / "p.tsv"
    sheet.write_text(TWO_PROMPTS, encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        prompts: {sheet}
        results: {tmp_path}/r
        shards: {shards}
        variants: [fp32]
        engines: [actdiff]
        engine_threads: 1
        reference: {{threads: 1}}
        stats: {{search_seconds: 0}}
        keep_activations: true
        models:
          tiny:
            source: {model_source}
            max_length: 64
        {extra}"""),
        encoding="utf-8",
    )
    return str(cfg)


def _ok(p):
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    return out


def test_empty_shard_runs_end_to_end(tmp_path):
    """Fewer prompts than shards is legal (the shard count is a config choice, the hash decides the rest): the
    empty shard gets empty tokens, dumps and statistics, and the verdict and report cover every prompt."""
    from actdiff.prompts import shard_of

    assert [shard_of(p, 2) for p in ("p1", "p3")] == [1, 1], "the test needs both prompts in one shard"
    model = ensure_tiny_model()
    _ok(snakemake("--cores", "2", "--configfile", _tiny_config(tmp_path, f"{{path: {model}}}")))
    r = tmp_path / "r"
    assert len(pd.read_parquet(r / "tiny/tokens/shard-0.parquet")) == 0
    assert len(pd.read_parquet(r / "tiny/tokens/shard-1.parquet")) == 2
    verdict = json.loads((r / "tiny/actdiff/fp32/summary/verdict.json").read_text())
    assert verdict["prompts"] == 2 and verdict["status"] == "pass", verdict["plain"]
    assert (r / "reports/tiny/actdiff/fp32.html").is_file() and (r / "reports/index.html").is_file()


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jobs(dry_run_output: str) -> set[str]:
    """Rule names of the jobs a dry run would start (its "Job stats" table)."""
    table = dry_run_output.split("Job stats:")[1].split("\n\n")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip() and line.split()[0] != "total"}


def test_model_replaced_in_place_reruns_and_records_current_hash(tmp_path):
    """A truncated checkpoint, then fixed in place with an OLDER modification time (cp -p, rsync -a): model.json,
    both dumps and the verdict record the fixed file's sha256, not the truncated one's (before, nothing listed
    the model's files as inputs, so the old record stayed). Then a touch reruns nothing, and a content change
    with an older mtime reruns everything computed from the model."""
    import shutil

    import h5py

    good = ensure_tiny_model()
    model = tmp_path / "model"
    shutil.copytree(good, model)  # copy2: the files keep the generated model's (older) mtimes
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    cfg = _tiny_config(tmp_path, f"{{path: {model}}}", shards=1)
    p = snakemake("--cores", "2", "--configfile", cfg)
    assert p.returncode != 0 and "is it truncated or corrupted" in p.stdout + p.stderr
    r = tmp_path / "r/tiny"
    assert json.loads((r / "model.json").read_text())["weights_sha256"] == _sha256(weights)

    shutil.copy2(good / "model.safetensors", weights)  # fixed in place, mtime older than model.json
    verdict = str(r / "actdiff/fp32/summary/verdict.json")  # no report: what is checked stops at the verdict
    _ok(snakemake(verdict, "--cores", "2", "--configfile", cfg))
    current = _sha256(weights)
    assert json.loads((r / "model.json").read_text())["weights_sha256"] == current
    assert json.loads((r / "actdiff/fp32/summary/verdict.json").read_text())["weights_sha256"] == current
    for side in ("reference", "actdiff"):
        with h5py.File(r / f"{side}/fp32/activations/shard-0.h5") as f:
            assert f.attrs["weights_sha256"] == current, side

    weights.touch()  # same content: the fingerprint is unchanged, so nothing reruns
    assert "Nothing to be done" in _ok(snakemake(verdict, "-n", "--cores", "2", "--configfile", cfg))

    old = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's last value: a valid checkpoint with other content
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns - 10**12))
    jobs = _jobs(_ok(snakemake(verdict, "-n", "--cores", "2", "--configfile", cfg)))
    # everything between the model and the verdict, each of which had finished with the previous content
    expected = {"resolve_model", "tokenize", "dump_reference", "dump_engine", "compute_stats", "aggregate_stats"}
    assert expected <= jobs, jobs


def _pickle_only_model(tmp_path):
    """The tiny model with its weights as pytorch_model.bin only (torch.save of the state dict)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    good = ensure_tiny_model()
    model = tmp_path / "model"
    shutil.copytree(good, model, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(load_file(str(good / "model.safetensors")), model / "pytorch_model.bin")
    return model


def test_pickle_checkpoint_refused_without_allow_pickle(tmp_path):
    model = _pickle_only_model(tmp_path)
    p = snakemake("--cores", "1", "--configfile", _tiny_config(tmp_path, f"{{path: {model}}}", shards=1))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"{model}: only ['pytorch_model.bin'] found (pickle); actdiff loads safetensors only" in out
    assert "set models.tiny.allow_pickle: true in the config if you trust the file" in out
    assert "Traceback" not in out


def test_pickle_checkpoint_loads_with_allow_pickle(tmp_path):
    """allow_pickle: true, where the refusal says, reaches every loader: resolve_model converts the pickle to
    safetensors once, and the reference, our engine, the statistics and weight parity read that copy. The
    record keeps the pickle's own sha256 and where it came from."""
    model = _pickle_only_model(tmp_path)
    cfg = _tiny_config(tmp_path, f"{{path: {model}}}", shards=1, extra="    allow_pickle: true\n")
    r = tmp_path / "r/tiny"
    run = r / "actdiff/fp32/summary"
    _ok(snakemake(str(run / "verdict.json"), str(run / "weights.parquet"), "--cores", "2", "--configfile", cfg))
    record = json.loads((r / "model.json").read_text())
    assert record["weights_file"] == "pytorch_model.bin" and record["source_dir"] == str(model)
    assert record["weights_sha256"] == _sha256(model / "pytorch_model.bin")
    verdict = json.loads((r / "actdiff/fp32/summary/verdict.json").read_text())
    assert verdict["status"] == "pass", verdict["plain"]  # fp32 engine vs reference on the same weights
    weights = pd.read_parquet(r / "actdiff/fp32/summary/weights.parquet")
    assert len(weights) > 0 and float(weights["rel_l2"].max()) == 0.0  # fp32 parity: the very same tensors
