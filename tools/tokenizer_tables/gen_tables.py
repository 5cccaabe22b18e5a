"""Generate the Unicode tables embedded in src/actdiff/engine/tokenizer.py (dev-time only).

Used by ``build.py``. Needs the ``regex`` package (grapheme properties) and ``tokenizers``.
"""

import array
import base64
import json
import unicodedata
import zlib
from pathlib import Path

import regex
from tokenizers import normalizers

HERE = Path(__file__).resolve().parent
# code points the reference (unicode-segmentation, Unicode 16) does not treat as grapheme extenders although the
# regex module (Unicode 17) does: probed as "\xa0"+X through the reference Precompiled normalizer (probe_gcb.py)
GCB_FIX = HERE / "gcb_fix.json"

GCB = ["Other", "CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark",
       "L", "V", "T", "LV", "LVT"]


def grapheme_blob(fix: set[int]) -> str:
    pats = [(i, regex.compile(r"\p{GCB=" + n + "}")) for i, n in enumerate(GCB) if i]
    ext = regex.compile(r"\p{ExtPict}")
    incb = [(1, regex.compile(r"\p{InCB=Linker}")), (2, regex.compile(r"\p{InCB=Consonant}")),
            (3, regex.compile(r"\p{InCB=Extend}"))]
    runs = []
    prev = None
    for cp in range(0x110000):
        c = chr(cp) if not 0xD800 <= cp < 0xE000 else None
        code = 0
        if c is not None:
            for i, p in pats:
                if p.match(c):
                    code = i
                    break
            if ext.match(c):
                code |= 16
            for i, p in incb:
                if p.match(c):
                    code |= i << 5
                    break
            if cp in fix:
                code &= 16
        else:
            code = 3  # surrogates: Control
        if code != prev:
            runs.append((cp, code))
            prev = code
    print("gcb runs", len(runs))
    buf = array.array("I", [cp << 8 | code for cp, code in runs]).tobytes()
    blob = base64.b64encode(zlib.compress(buf, 9)).decode()
    print("gcb blob", len(blob))
    return blob


def ranges(s) -> str:
    out = []
    for c in sorted(s):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return " ".join(f"{a:X}" if a == b else f"{a:X}-{b:X}" for a, b in out)


def generate(d: dict, fix: set[int] | None = None) -> dict:
    """Tables from a ``probe_bert.probe()`` result ``d`` and the grapheme fix set (default: gcb_fix.json)."""
    if fix is None:
        fix = set(json.loads(GCB_FIX.read_text())["sep"])
    blob = grapheme_blob(fix)
    strip = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True,
                                       lowercase=False)
    mn = set()
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        if unicodedata.normalize("NFD", c) == c and strip.normalize_str(c) == "":
            mn.add(cp)
    # combining classes as seen by the HF NFD (probe reordering against U+0345, ccc 240)
    nfd = normalizers.NFD()
    ccc_zero = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        if 0 < unicodedata.combining(c) < 240 and unicodedata.normalize("NFD", c) == c:
            s = "a\u0345" + c
            if nfd.normalize_str(s) == s:
                ccc_zero.append(cp)
    low = {cp: lo for cp, lo, _ in d["low_diff"]}
    out = {
        "GRAPHEME_BLOB": blob,
        "BERT_CONTROL": ranges(d["removed"]),
        "BERT_PUNCT": ranges(d["punct"]),
        "BERT_MN": ranges(mn),
        "WHITE_SPACE": ranges(d["pws"]),
        "NFD_NO_DECOMPOSE": ranges(d["nfd_diff"]),
        "NFKD_NO_DECOMPOSE": ranges(d["nfkd_diff"]),
        "NFD_CCC_ZERO": ranges(ccc_zero),
        "LOWER": " ".join(f"{cp:X}:{' '.join(f'{ord(x):X}' for x in lo).replace(' ', '+')}"
                          for cp, lo in sorted(low.items())),
    }
    for k, v in out.items():
        print(k, len(v))
    return out
