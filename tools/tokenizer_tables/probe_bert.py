"""Probe the installed ``tokenizers`` BERT normalizer / pre-tokenizer at every code point (dev-time only).

Used by ``build.py``; ``python tools/tokenizer_tables/probe_bert.py OUT.json`` writes the probe on its own.
"""

import json
import sys
import time
import unicodedata

from tokenizers import normalizers, pre_tokenizers


def probe() -> dict:
    t = time.time()
    clean = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                       lowercase=False)
    strip = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True,
                                       lowercase=False)
    nfd = normalizers.NFD()
    nfkd = normalizers.NFKD()
    low = normalizers.Lowercase()
    pre = pre_tokenizers.BertPreTokenizer()
    removed = []
    ws = []
    punct = []
    mn = []
    nfd_diff = []
    nfkd_diff = []
    low_diff = []
    pws = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        r = clean.normalize_str(c)
        if r == "":
            removed.append(cp)
        elif r == " " and c != " ":
            ws.append(cp)
        elif r != c:
            print("odd clean", hex(cp), repr(r))
        p = pre.pre_tokenize_str("a" + c + "a")
        if len(p) == 3:
            punct.append(cp)
        elif len(p) == 2 and p[0][0] == "a" and p[1][0] == "a":
            pws.append(cp)
        elif len(p) != 1:
            print("odd pre", hex(cp), p)
        s = strip.normalize_str(c)
        d = nfd.normalize_str(c)
        if d != unicodedata.normalize("NFD", c):
            nfd_diff.append(cp)
        if nfkd.normalize_str(c) != unicodedata.normalize("NFKD", c):
            nfkd_diff.append(cp)
        s_py = "".join(x for x in unicodedata.normalize("NFD", c) if unicodedata.category(x) != "Mn")
        if s != s_py:
            mn.append((cp, s, s_py))
        lo = low.normalize_str(c)
        if lo != c.lower():
            low_diff.append((cp, lo, c.lower()))
    print(f"bert probe {time.time() - t:.1f} s")
    print("removed", len(removed), "ws", len(ws), "punct", len(punct), "pws", len(pws), "nfd_diff", len(nfd_diff),
          "mn diff", len(mn), "low_diff", len(low_diff))
    return dict(removed=removed, ws=ws, punct=punct, pws=pws, nfd_diff=nfd_diff, nfkd_diff=nfkd_diff, mn=mn, low_diff=low_diff)


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(probe(), f)
