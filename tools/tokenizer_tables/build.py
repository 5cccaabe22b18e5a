import json, textwrap
t = json.load(open("/tmp/tokdev/tables.json"))
src = open("/tmp/tokdev/tokenizer_template.py").read()
def lit(s, indent=4):
    # wrap long strings into implicit concatenation inside parentheses
    if len(s) < 90:
        return json.dumps(s)
    chunks = textwrap.wrap(s, 100, break_long_words=True, break_on_hyphens=False, drop_whitespace=False)
    return "(\n" + "".join(" " * indent + json.dumps(c) + "\n" for c in chunks) + ")"
for k in ["BERT_CONTROL", "BERT_PUNCT", "BERT_MN", "WHITE_SPACE", "NFD_NO_DECOMPOSE", "NFD_CCC_ZERO", "LOWER", "GRAPHEME_BLOB"]:
    src = src.replace(f'"@@{k}@@"', lit(t[k]))
open("/work/main/src/actdiff/engine/tokenizer.py", "w").write(src)
