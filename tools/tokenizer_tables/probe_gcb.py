"""Probe grapheme-cluster handling: reference ``Precompiled`` normalizer vs the engine's (dev-time only).

    python tools/tokenizer_tables/probe_gcb.py [TOKENIZER_JSON] [--out OUT.json]

TOKENIZER_JSON is a tokenizer.json with a ``Precompiled`` normalizer (default: the tiny nomic model the workflow
generates, ``resources/models/tiny-nomic-moe/tokenizer.json``). Each code point X is normalized as "\\xa0"+X by
both; "sep" lists the code points the reference separates but the engine joins. Run against the engine without
the fix, that list is ``gcb_fix.json``; with the committed tables both lists should be empty.
"""

import argparse
import base64
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from tokenizers import normalizers  # noqa: E402

from actdiff.engine import tokenizer as T  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer_json", nargs="?", type=Path,
                    default=REPO / "resources" / "models" / "tiny-nomic-moe" / "tokenizer.json")
    ap.add_argument("--out", type=Path, help="write {join, sep} here")
    args = ap.parse_args()
    spec = json.loads(args.tokenizer_json.read_text())
    ref = normalizers.Precompiled(base64.b64decode(spec["normalizer"]["precompiled_charsmap"]))
    eng = T._Precompiled("x", spec["normalizer"]["precompiled_charsmap"])
    base = ref.normalize_str("\xa0")
    diff_join = []
    diff_sep = []
    amb = 0
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        x = chr(cp)
        if ref.normalize_str(x) == "":
            amb += 1
            continue
        r = ref.normalize_str("\xa0" + x)
        e = eng("\xa0" + x)
        if r != e:
            (diff_join if r == base else diff_sep).append(cp)
    print("amb", amb, "ref joins but eng not", len(diff_join), [hex(c) for c in diff_join[:40]])
    print("ref separates but eng joins", len(diff_sep), [hex(c) for c in diff_sep[:80]])
    if args.out:
        args.out.write_text(json.dumps(dict(join=diff_join, sep=diff_sep)))


if __name__ == "__main__":
    main()
