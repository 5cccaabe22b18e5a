import sys, json, base64
sys.path.insert(0, "src")
from actdiff.engine import tokenizer as T
from tokenizers import normalizers
spec = json.load(open("resources/models/tiny-nomic-moe/tokenizer.json"))
ref = normalizers.Precompiled(base64.b64decode(spec["normalizer"]["precompiled_charsmap"]))
eng = T._Precompiled("x", spec["normalizer"]["precompiled_charsmap"])
base = ref.normalize_str("\xa0")
diff_join = []; diff_sep = []; amb = 0
for cp in range(0x110000):
    if 0xD800 <= cp < 0xE000: continue
    x = chr(cp)
    if ref.normalize_str(x) == "":
        amb += 1; continue
    r = ref.normalize_str("\xa0" + x)
    e = eng("\xa0" + x)
    if r != e:
        (diff_join if r == base else diff_sep).append(cp)
print("amb", amb, "ref joins but eng not", len(diff_join), [hex(c) for c in diff_join[:40]])
print("ref separates but eng joins", len(diff_sep), [hex(c) for c in diff_sep[:80]])
json.dump(dict(join=diff_join, sep=diff_sep), open("/tmp/tokdev/gcb_diff.json", "w"))
