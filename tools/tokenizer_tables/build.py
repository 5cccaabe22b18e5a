"""Regenerate the Unicode tables embedded in ``src/actdiff/engine/tokenizer.py`` (dev-time only).

From the repository root of a checkout (any location)::

    pip install regex            # grapheme properties; tokenizers comes with actdiff
    python tools/tokenizer_tables/build.py
    git diff --stat src/actdiff/engine/tokenizer.py

It probes the installed ``tokenizers`` at every code point (``probe_bert.py``), builds the tables
(``gen_tables.py``, with the committed grapheme fix set ``gcb_fix.json``) and rewrites the table assignments of
the module in place; the rest of the module is left as it is. ``--tables-json PATH`` also writes the tables.
"""

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGET = REPO / "src" / "actdiff" / "engine" / "tokenizer.py"
sys.path.insert(0, str(HERE))

# table key -> module-level name in tokenizer.py
NAMES = {
    "BERT_CONTROL": "BERT_CONTROL",
    "BERT_PUNCT": "BERT_PUNCT",
    "BERT_MN": "BERT_MN",
    "WHITE_SPACE": "WHITE_SPACE",
    "NFD_NO_DECOMPOSE": "NFD_NO_DECOMPOSE",
    "NFKD_NO_DECOMPOSE": "NFKD_NO_DECOMPOSE",
    "NFD_CCC_ZERO": "NFD_CCC_ZERO",
    "LOWER": "LOWER_OVERRIDES",
    "GRAPHEME_BLOB": "GRAPHEME_BLOB",
}


def lit(s, indent=4):
    # wrap long strings into implicit concatenation inside parentheses
    if len(s) < 90:
        return json.dumps(s)
    chunks = textwrap.wrap(s, 100, break_long_words=True, break_on_hyphens=False, drop_whitespace=False)
    return "(\n" + "".join(" " * indent + json.dumps(c) + "\n" for c in chunks) + ")"


def splice(src: str, tables: dict) -> str:
    for key, name in NAMES.items():
        # NAME = "..."  or  NAME = (\n    "..."\n    ...\n)
        pat = re.compile(rf'^{name} = (?:"[^"\n]*"|\(\n(?:    "[^"\n]*"\n)*\))$', re.M)
        src, n = pat.subn(lambda m, v=tables[key], nm=name: f"{nm} = {lit(v)}", src)
        if n != 1:
            raise SystemExit(f"{TARGET}: expected one assignment of {name}, found {n}")
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables-json", type=Path, help="also write the generated tables here")
    args = ap.parse_args()
    import gen_tables
    import probe_bert

    tables = gen_tables.generate(probe_bert.probe())
    if args.tables_json:
        args.tables_json.write_text(json.dumps(tables))
    TARGET.write_text(splice(TARGET.read_text(), tables))
    print("wrote", TARGET.relative_to(REPO))


if __name__ == "__main__":
    main()
