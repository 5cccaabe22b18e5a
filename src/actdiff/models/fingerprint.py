"""Which content a run's results were computed from: the sha256 of every model file they depend on.

Snakemake reruns a rule when an input is newer than its outputs, so a model file replaced in place with an
older modification time (``cp -p``, ``rsync -a``), or a run that never listed the model's files as inputs,
would leave old results, and old hashes, standing. So when the workflow starts, each configured model's files
are fingerprinted into ``results/{model}/model-files.json`` ({file: sha256}), which rule resolve_model takes
as input. That file is rewritten only when a hash changed: then resolve_model, and everything computed from
the model, reruns; a ``touch`` or ``chmod`` changes nothing. A file is read again only when its (size,
mtime_ns, ctime_ns) differs from the one cached beside the fingerprint (the ctime cannot be set back, so a
replacement always shows), so a start costs a few ``stat`` calls, not a read of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_json_atomic
from .loading import sha256_file, tracked_files


def cache_path(fingerprint: str | Path) -> Path:
    """The stat cache kept beside a fingerprint (hidden: not an input of any rule, so rewriting it after a
    touch reruns nothing)."""
    p = Path(fingerprint)
    return p.with_name(f".{p.stem}.stat.json")


def current_hashes(model_dir: str | Path, allow_pickle: bool, fingerprint: str | Path) -> dict[str, str]:
    """sha256 of each tracked file of ``model_dir`` as it is now; a file whose stat equals the cached one is
    not read again. Updates the cache."""
    cache_file = cache_path(fingerprint)
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    new, hashes = {}, {}
    for p in tracked_files(model_dir, allow_pickle):
        st = p.stat()
        key = [str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        old = cache.get(p.name)
        sha = old["sha256"] if old and old.get("stat") == key else sha256_file(p)
        new[p.name] = {"stat": key, "sha256": sha}
        hashes[p.name] = sha
    if new != cache:
        write_json_atomic(cache_file, new)
    return hashes


def update_fingerprint(model_dir: str | Path, allow_pickle: bool, fingerprint: str | Path) -> bool:
    """Write ``fingerprint`` ({file: sha256}) when it is missing or a hash changed; True if it was written."""
    hashes = current_hashes(model_dir, allow_pickle, fingerprint)
    fp = Path(fingerprint)
    try:
        if json.loads(fp.read_text(encoding="utf-8")) == hashes:
            return False
    except (OSError, ValueError):
        pass
    write_json_atomic(fp, hashes)
    return True
