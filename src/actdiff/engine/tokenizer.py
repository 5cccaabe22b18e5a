"""The inference engine's own tokenizer: reads a HuggingFace ``tokenizer.json`` in pure Python.

No ``tokenizers``, ``transformers``, ``sentencepiece`` or ``torch`` here: the engine must not share code with
the reference it is compared against. What is implemented is exactly what the two default models use:

* SentencePiece Unigram (XLM-R style): ``Precompiled`` normalizer (SentencePiece charsmap: a Darts
  double-array trie over UTF-8 bytes plus a NUL-separated string pool, applied per extended grapheme cluster
  the way HF ``tokenizers`` does), ``WhitespaceSplit`` / ``Metaspace`` pre-tokenizers, ``Unigram`` model
  (Viterbi; unknown characters score ``min_score - 10`` and consecutive unknowns fuse into one unk token).
* WordPiece (BERT style): ``BertNormalizer``, ``BertPreTokenizer``, ``WordPiece`` (greedy longest match,
  ``##`` continuation prefix, over-long words become the unk token).
* Normalizers as HF ``tokenizers`` defines them, alone or in a ``Sequence``: ``Replace`` (``String`` pattern
  literal, ``Regex`` compiled with Python's ``re``), ``NFC``/``NFD``/``NFKC``/``NFKD`` (the crate's older Unicode
  data: see below), ``Lowercase`` (per character, Rust's mappings), ``Strip`` (Rust white space, left/right).
* Added tokens with ``normalized=false`` are matched in the raw text first (leftmost-longest, with the
  ``lstrip``/``rstrip`` options), then ``TemplateProcessing`` / ``BertProcessing`` adds the special tokens.

Anything else in a tokenizer.json raises :class:`~actdiff.errors.ModelError` naming the file and the
component, so the engine never differs silently.

transformers compatibility: transformers 5 does not run every tokenizer.json as written. For a known
``tokenizer_class`` in the sibling ``tokenizer_config.json`` it rebuilds parts of the pipeline in Python
(``XLMRobertaTokenizer``: pre-tokenizer ``Sequence[WhitespaceSplit, Metaspace]``, normalizer only the first
``Precompiled`` charsmap of the tokenizer.json's normalizer, every other normalizer dropped; ``BertTokenizer``:
``BertNormalizer``/``BertPreTokenizer`` from the config's
``do_lower_case``/``strip_accents``/``tokenize_chinese_chars``). With ``transformers_compat=True`` (the default)
the engine applies the same rebuild, so its ids equal ``transformers.AutoTokenizer``'s; with ``False`` it
follows the tokenizer.json literally, like ``tokenizers.Tokenizer.from_file``. An unknown ``tokenizer_class``
raises in compat mode. The ``truncation``/``padding`` blocks of a tokenizer.json are ignored, as transformers
does when called with explicit arguments: truncation is ``encode(text, max_length)``.

Unicode data: character classes are taken from the Unicode versions the reference's Rust crates were built
with (they differ from Python's ``unicodedata``): the BERT tables below are the ``unicode_categories`` crate's
(old) Cc/Cf/Co, P* and Mn sets, Rust's White_Space and to_lowercase deltas, the NFD crate's exceptions (code
points it does not decompose, canonically or by compatibility, and combining classes it does not know); the
grapheme-cluster table is UAX #29 Grapheme_Cluster_Break + Extended_Pictographic + InCB. They were generated
by probing the reference implementation over every code point (tests/test_engine_tokenizer.py re-checks the
BERT tables, and every normalizer on fuzzed strings, against the installed ``tokenizers``).
"""

from __future__ import annotations

import base64
import json
import re
import sys
import unicodedata
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from ..errors import ModelError

__all__ = ["EngineTokenizer"]

# --------------------------------------------------------------------------------------------------------------
# Unicode tables (see module docstring). Ranges are hex code points, "A-B" inclusive.

BERT_CONTROL = (
    "0-8 B-C E-1F 7F-9F AD 600-605 61C 6DD 70F 180E 200B-200F 202A-202E 2060-2064 2066-206F E000-F8FF "
    "FEFF FFF9-FFFB FFFD 110BD 1BCA0-1BCA3 1D173-1D17A E0001 E0020-E007F F0000-FFFFD 100000-10FFFD"
)
BERT_PUNCT = (
    "21-2F 3A-40 5B-60 7B-7E A1 A7 AB B6-B7 BB BF 37E 387 55A-55F 589-58A 5BE 5C0 5C3 5C6 5F3-5F4 609-60A"
    " 60C-60D 61B 61E-61F 66A-66D 6D4 700-70D 7F7-7F9 830-83E 85E 964-965 970 AF0 DF4 E4F E5A-E5B F04-F12"
    " F14 F3A-F3D F85 FD0-FD4 FD9-FDA 104A-104F 10FB 1360-1368 1400 166D-166E 169B-169C 16EB-16ED "
    "1735-1736 17D4-17D6 17D8-17DA 1800-180A 1944-1945 1A1E-1A1F 1AA0-1AA6 1AA8-1AAD 1B5A-1B60 1BFC-1BFF "
    "1C3B-1C3F 1C7E-1C7F 1CC0-1CC7 1CD3 2010-2027 2030-2043 2045-2051 2053-205E 207D-207E 208D-208E "
    "2308-230B 2329-232A 2768-2775 27C5-27C6 27E6-27EF 2983-2998 29D8-29DB 29FC-29FD 2CF9-2CFC 2CFE-2CFF "
    "2D70 2E00-2E2E 2E30-2E42 3001-3003 3008-3011 3014-301F 3030 303D 30A0 30FB A4FE-A4FF A60D-A60F A673 "
    "A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC A92E-A92F A95F A9C1-A9CD A9DE-A9DF AA5C-AA5F "
    "AADE-AADF AAF0-AAF1 ABEB FD3E-FD3F FE10-FE19 FE30-FE52 FE54-FE61 FE63 FE68 FE6A-FE6B FF01-FF03 "
    "FF05-FF0A FF0C-FF0F FF1A-FF1B FF1F-FF20 FF3B-FF3D FF3F FF5B FF5D FF5F-FF65 10100-10102 1039F 103D0 "
    "1056F 10857 1091F 1093F 10A50-10A58 10A7F 10AF0-10AF6 10B39-10B3F 10B99-10B9C 11047-1104D "
    "110BB-110BC 110BE-110C1 11140-11143 11174-11175 111C5-111C9 111CD 111DB 111DD-111DF 11238-1123D "
    "112A9 114C6 115C1-115D7 11641-11643 1173C-1173E 12470-12474 16A6E-16A6F 16AF5 16B37-16B3B 16B44 "
    "1BC9F 1DA87-1DA8B"
)
BERT_MN = (
    "300-33F 342 345-36F 483-487 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F 670 6D6-6DC 6DF-6E4 "
    "6E7-6E8 6EA-6ED 711 730-74A 7A6-7B0 7EB-7F3 816-819 81B-823 825-827 829-82D 859-85B 8E3-902 93A 93C "
    "941-948 94D 951-957 962-963 981 9BC 9C1-9C4 9CD 9E2-9E3 A01-A02 A3C A41-A42 A47-A48 A4B-A4D A51 "
    "A70-A71 A75 A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 B01 B3C B3F B41-B44 B4D B56 B62-B63 B82 BC0 BCD "
    "C00 C3E-C40 C46-C47 C4A-C4D C55-C56 C62-C63 C81 CBC CBF CC6 CCC-CCD CE2-CE3 D01 D41-D44 D4D D62-D63 "
    "DCA DD2-DD4 DD6 E31 E34-E3A E47-E4E EB1 EB4-EB9 EBB-EBC EC8-ECD F18-F19 F35 F37 F39 F71-F72 F74 F77 "
    "F79-F7E F80 F82-F84 F86-F87 F8D-F92 F94-F97 F99-F9C F9E-FA1 FA3-FA6 FA8-FAB FAD-FB8 FBA-FBC FC6 "
    "102D-1030 1032-1037 1039-103A 103D-103E 1058-1059 105E-1060 1071-1074 1082 1085-1086 108D 109D "
    "135D-135F 1712-1714 1732-1734 1752-1753 1772-1773 17B4-17B5 17B7-17BD 17C6 17C9-17D3 17DD 180B-180D "
    "18A9 1920-1922 1927-1928 1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E 1A60 1A62 1A65-1A6C 1A73-1A7C "
    "1A7F 1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C 1B42 1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BA9 1BAB-1BAD "
    "1BE6 1BE8-1BE9 1BED 1BEF-1BF1 1C2C-1C33 1C36-1C37 1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED 1CF4 1CF8-1CF9 "
    "1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1 20E5-20F0 2CEF-2CF1 2D7F 2DE0-2DFF 302A-302D 3099-309A A66F "
    "A674-A67D A69E-A69F A6F0-A6F1 A802 A806 A80B A825-A826 A8C4 A8E0-A8F1 A926-A92D A947-A951 A980-A982 "
    "A9B3 A9B6-A9B9 A9BC A9E5 AA29-AA2E AA31-AA32 AA35-AA36 AA43 AA4C AA7C AAB0 AAB2-AAB4 AAB7-AAB8 "
    "AABE-AABF AAC1 AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E FE00-FE0F FE20-FE2F 101FD 102E0 10376-1037A "
    "10A01-10A03 10A05-10A06 10A0C-10A0F 10A38-10A3A 10A3F 10AE5-10AE6 11001 11038-11046 1107F-11081 "
    "110B3-110B6 110B9-110BA 11100-11102 11127-1112B 1112D 11130-11134 11173 11180-11181 111B6-111BE "
    "111CA-111CC 1122F-11231 11234 11236-11237 112DF 112E3-112EA 11300-11301 1133C 11340 11366-1136C "
    "11370-11374 114B3-114B8 114BA 114BF-114C0 114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 "
    "115DC-115DD 11633-1163A 1163D 1163F-11640 116AB 116AD 116B0-116B5 116B7 1171D-1171F 11722-11725 "
    "11727-1172B 16AF0-16AF4 16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182 1D185-1D18B "
    "1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF 1E8D0-1E8D6 "
    "E0100-E01EF"
)
WHITE_SPACE = "9-D 20 85 A0 1680 2000-200A 2028-2029 202F 205F 3000"
NFD_NO_DECOMPOSE = "11938"
NFKD_NO_DECOMPOSE = "32FF A7F2-A7F4 AB69 10781-10785 10787-107B0 107B2-107BA 11938 1F16C 1FBF0-1FBF9"
NFD_CCC_ZERO = (
    "7FD 898-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1ACE 1DF6-1DFA A82C 10D24-10D27 10EAB-10EAC "
    "10F46-10F50 10F82-10F85 11070 1133B 1145E 11839-1183A 1193D-1193E 11943 119E0 11A34 11A47 11A99 "
    "11D42 11D44-11D45 11D97 16FF0-16FF1 1E130-1E136 1E2AE 1E2EC-1E2EF"
)
LOWER_OVERRIDES = (
    "1C89:1C8A A7CB:264 A7CC:A7CD A7CE:A7CF A7D2:A7D3 A7D4:A7D5 A7DA:A7DB A7DC:19B 10D50:10D70 "
    "10D51:10D71 10D52:10D72 10D53:10D73 10D54:10D74 10D55:10D75 10D56:10D76 10D57:10D77 10D58:10D78 "
    "10D59:10D79 10D5A:10D7A 10D5B:10D7B 10D5C:10D7C 10D5D:10D7D 10D5E:10D7E 10D5F:10D7F 10D60:10D80 "
    "10D61:10D81 10D62:10D82 10D63:10D83 10D64:10D84 10D65:10D85 16EA0:16EBB 16EA1:16EBC 16EA2:16EBD "
    "16EA3:16EBE 16EA4:16EBF 16EA5:16EC0 16EA6:16EC1 16EA7:16EC2 16EA8:16EC3 16EA9:16EC4 16EAA:16EC5 "
    "16EAB:16EC6 16EAC:16EC7 16EAD:16EC8 16EAE:16EC9 16EAF:16ECA 16EB0:16ECB 16EB1:16ECC 16EB2:16ECD "
    "16EB3:16ECE 16EB4:16ECF 16EB5:16ED0 16EB6:16ED1 16EB7:16ED2 16EB8:16ED3"
)
# zlib + base64 of uint32 (first_code_point << 8 | code) runs; code = GCB index | 16*ExtPict | 32*InCB
GRAPHEME_BLOB = (
    "eNoV13uczXX+B/DPt5lyMMNxy7iMS42kKESR21GEDbFLscs29LVpy0axj/qVdtx26UfRslHZH/tQP+PWjFvUDDNyv44i2p9qFMVG"
    "O4qiyO+5fz1f7/fn8z3ne877e77nnLQQwjVVQkirGkKUyWoaTfgnLgohmc9l6pXyKvntEOKQFsLYtBBPSQ/hxfQQz7k2hE3Xhngz"
    "S1jK97mV27mDO68NlcJ1IVx3XYiTbHBdSGvIbPX9zOVYjuNH14VKn8ifyp/xJL/iaf6L31ivXskJVQpxDdZka97Pt1jIr3meV/gz"
    "r0+EUD8R4gbMYTPezBa8jUM5LBEqzeYr6le5iLv1PucXiZBIqxxCeuWQqlM5xHdXDolO7KzXRe4qd2efyiGnH/vrD9AbaP8QOVce"
    "yVj9DPPUk+ybLE/Vm8d8LmMhV3MN1/Nde4tYzE2O2cxS9TZ5B3dxj+fdJ++3doRHHXuMn/Izlut/zhPqCn6r/plXGVXx2lwE6VW8"
    "HnZRd5W7y/eyF/vwfvbnQP6SY/kUJ/CPnOS4KfLUKl4P87mMhVzNtVzHd+0tYrH9m+RSeTt3qHfJu7mnitcj79f/nCcce0n+UQ5V"
    "nXPVkLjGRZte1TzYgrewDduyHdvzbns7swu7OibF7uqeci/24f1VzUzub20whzh2GH/Lh5mrP5KxehyfUk/mFG5y/GaWsFTvfW7n"
    "Lu7W3yfv5xEeZcgIiSgjxOkZIVyb4dzZgrfwbv3O7MKu9nWXe8r3sQ9/keE85f7yYD7kuCH8jXokY05y3GR5qlzEYvUmeTNLuYXv"
    "62+Tt3MXd3M/D/MIP+cJ+77jeXXI9F67OaRnOt/MEHeSu7Crfjd2V/eU72Mf/iLTeWaGSv3VD1h/iEM4kjEn2TNZnirv5h4e0Cvj"
    "B+rD/IhH9I7Kn8nl8rc8r27jJtW2WkjcUS3E7eRO7MUHWMjV1tbIa+Vi7uQBZlV3D6ge4va8k3exAzvy7uqueabU4+Q/MU89jX/m"
    "dM7ifC5gMbdzR/WQCskQbk2GuFUyJNqwrbpDMuR0lO/W68QuyZDqpp/iAL0H9YbIv+ZvOcLaSI7io/yD/jhO4GS9KY6ZKk+T/8JZ"
    "1l6SX5YX8u/JUDnUCFVya4SqS2v4jNQM8fBart1aIa5ZN4Tr6zovtucvOYhPcXzdkMqT19YNifV8h5u4nTu4q27I+YAf2nuIn/BT"
    "Vs3yXZEV4upZ7sOcxr8wn8vYpF5I3FgvxM3Zol4ILdla3ZZ3sKNeZ9atHxL16rsv1w+hYf2QaqIerH6QD3GI/sP1Q04uR6hH8hGO"
    "sj6GT6sn8k/MYwE/ZTnPMDQIifQGPmsNQqoqM1mrgetGvyvvaRByeuj1tNZP/TjHM8/6ZP0pXKz+B9/iUvuXc4W1VfYW8D1u0vvS"
    "nq94iv/iWX7Df1s/L+c0DHHLhiHRjnc2dI2wjB/ykP5xfq4+zbP8hucbhiYXrP0gX9T7kSXZ5tvId3aTkJ7RJIzKbGIWvrSTvJm3"
    "NwnJzuzCPvyFfi7HNvF8PKd/Q9MQbmwakh15N+fyNeZzOevfaB43huTNbMEDLONpnudF/sQtOe55OSG5rFkIK5qF5Hq+wxKW8ide"
    "ZbjJDG4KyWqszhqsydq8nlmsx2w2YhM25Q3M4U1szlt4K29ja3ZgJ6bYnffwXvbmID7MEXyEMUfxUY7mY3yOz/MF5vEVzucCvsbX"
    "uZCL+A/+L5dyGVewgKtZzM3cyu3cyV3czzIe5Af8kId5ml+zgt/zB/7EK/yZ1zT3o6t5SF7L65hgNVZnkjVZi7VZh9ezLrPZiE15"
    "A29mC97B9uzBnuzF3uzLfuzPB/grPsiHOISPcBTncT4X8x8sYCE3s4TtWrintnC+t4aQuDUkGzCbAziQg/ngrT4LLf32aOnz2sr7"
    "3crnlOG2EN/SOiRbt/b9zS7s2tp9lq+rX23ruduaCV9rG+In3wrh6bdCPJ4v8O9cxAp+y2uWeu+Whvg6VmJVZix1P5Kbsbn6Zrkl"
    "W6nzOJlr9bbK21nOb3mVId+l44fwbeyVHxK/5K/Ug/JD5VxOVOfpT5Gn5ofUDM7ky/pr9NdyPd9lETflh5wSe0rtKdc7KX8pf8UK"
    "/sir+i2WhcTty3zf8Q6290P8Lt7LHuyr30/uvyykcjmW4zie/8Xn7HmeE9UvME9dwEKu5jq+w43cxBKWcov95R77a/UZfqNXwQvL"
    "Qs738g/WS5aH8H/LQ+KL5c6fX/IUT+t/zTPqs/I3y/3iWREyoxUhoyGz2YEdOYiDOZbjOJOzuJT53MptLOdxXuYVZq0MmfVWhox2"
    "bM8BHMgnOIbTOYNL+CZLWMpj/IQXeYm1V4XMOqtCRmu2YV/242g+xqmcxkVczCIW8yg/5nleYPLtkFnj7ZDRkq3Ym30YcxTzOIlv"
    "cCE3cCMP8TAreI4ZBSEzsyBk3MwW7MGezOUIPs+JnM8FXMt1LONBnuFZJgpDZuXCkJHDZkyxO4dxOJ/hs5zLeSxgIfdyH0/xNNNX"
    "h8xrV4eMJmzKzuzCIRzK8ZzA2ZzDFVzJndzFEzzJsMb815g/s9mBHTmIgzmW4ziTs7iU+dzKbSzncV7mFWatNf+15s/2HMCBfIJj"
    "OJ0zuIRvsoSlPMZPeJGXWHud+a8zf7ZhX/bjaD7GqZzGRVzMIhbzKD/meV5gcr35rzd/tmJv9mHMUczjJL7BhdzAjTzEw6zgOWa8"
    "Y/7vmD9bsAd7Mpcj+Dwncj4XcC3XsYwHeYZnmdhg/hvMn82YYncO43A+w2c5l/NYwELu5T6e4mmmbzT/jebPpuzMLhzCoRzPCZzN"
    "OVzBldzJXTzBkwzvmv+75s9sdmBHDuJgjuU4zuQsLmU+t3Iby3mcl3mFWe+Z/3vmz/YcwIF8gmM4nTO4hG+yhKU8xk94kZdYu8j8"
    "i8yfbdiX/Tiaj3Eqp3ERF7OIxTzKj3meF5gsNv9i82cr9mYfxhzFPE7iG1zIDdzIQzzMCp5jxibz32T+bMEe7MlcjuDznMj5XMC1"
    "XMcyHuQZnmVis/lvNn82Y4rdOYzD+Qyf5VzOYwELuZf7eIqnmV5i/iXmz6bszC4cwqEczwmczTlcwZXcyV08wZMMpeZfav7MZgd2"
    "5CAO5liO40zO4lLmcyu3sZzHeZlXmLXF/LeYP9tzAAfyCY7hdM7gEr7JEpbyGD/hRV5i7ffN/33zZxv2ZT+O5mOcymlcxMUsYjGP"
    "8mOe5wUmt5r/VvNnK/ZmH8YcxTxO4htcyA3cyEM8zAqeY8Y2899m/mzBHuzJXI7g85zI+VzAtVzHMh7kGZ5lYrv5bzd/NmOK3TmM"
    "w/kMn+VczmMBC7mX+3iKp5m+w/x3mD+bsjO7cAiHcjwncDbncAVXcid38QRPMuw0/53mz2x2YEcO4mCO5TjO5CwuZT63chvLeZyX"
    "eYVZu8x/l/mzPQdwIJ/gGE7nDC7hmyxhKY/xE17kJdbebf67zZ9t2Jf9OJqPcSqncREXs4jFPMqPeZ4XmNxj/nvMn63Ym30YcxTz"
    "OIlvcCE3cCMP8TAreI4Ze81/r/mzBXuwJ3M5gs9zIudzAddyHct4kGd4lol95r/P/NmMKXbnMA7nM3yWczmPBSzkXu7jKZ5m+n7z"
    "32/+bMrO7MIhHMrxnMDZnMMVXMmd3MUTPMlwwPwPmD+z2YEdOYiDOZbjOJOzuJT53MptLOdxXuYVZpWZf5n5sz0HcCCf4BhO5wwu"
    "4ZssYSmP8RNe5CXWPmj+B82fbdiX/Tiaj3Eqp3ERF7OIxTzKj3meF5j8wPw/MH+2Ym/2YcxRzOMkvsGF3MCNPMTDrOA5Znxo/h+a"
    "P1uwB3sylyP4PCdyPhdwLdexjAd5hmeZOGT+h8yfzZhidw7jcD7DZzmX81jAQu7lPp7iaaYfNv/D5s+m7MwuHMKhHM8JnM05XMGV"
    "3MldPMGTDB+Z/0fmz2x2YEcO4mCO5TjO5CwuZT63chvLeZyXeYVZR8z/iPmzPQdwIJ/gGE7njCMhLDkSqhRwx5FQdQ8vHwlp4aj/"
    "c+UhbvRTCI1/CnH42f/pn0PchK1/DmlXGa76T3nVf8qrIa2Cl9VXoij8HEVx+TVROH5NFP8xLQrPpUWpUCWKoypRSOe1rMSMKlEq"
    "KddmHWaxHu+01oGdqkQ53ZhSn+RXzMmMws2ZUfwY/8Dl1aKwsloU72EZKxiqR/F91aMwkJP55+pRIiQ9fzJKXJOMQprcgb04luP4"
    "NCfwT/ZMlqewQL2G73Cj3nvJqFIxN6m38H31Pu5XhxpRKq1GFDevESVaslWNKOcOtqsRhfbWeuj3ZC91b/2nOZ55+pPlKVyjXs/N"
    "LNErrRFV2sKt6l3cZ22/fEAu+8/z1Izi22tGibZsVzMKHdiV3did9/Az6+X8Qv01Qy3vQS1zqBXFndiFXfW6McXuej3Zi314v34/"
    "uT8f4hC9kYzVv+MYjuWEWlEqjy/yvzmTL/FlzuZ6+zY4diPfU5dyC9/nNm7nDuu75T3cq95fK8opqxVVOih/oP8hj/ML6+1rm2Ht"
    "KJHiPezJ+2qbKX/Lh1mgX8g13Mh3+R6LuYmbWcot9m/l23XMvE4Ur67jfOUNchE3cbNeKY/xU73W10fxHddHiU7swq7sdn0UunO5"
    "egVXchUL9Dcwu26UaFQ3ihvXjUIT3qC+ic3VLeWWWeaZFSU6sGOW6z/L56aez0q9KFWZVZjB2qzDusyqF8Wt60WJNuo7eRc76nWq"
    "F+V0rRdV6qaXYnfeo3+v9R7yQfmQfJT/VB9jufq4fIInPXao7zNTP0pV5R31o0TH+lGTu+VO9V1j9aOcXuxtfYDeQOsPcah6WP2o"
    "0lT5Rb1XOd/eBfa+Zq1KgyhUbRDFuQ2ixAiO5Cj+jo9aG83bG3pNDaNwFzs09N6ymzrFV7hUL19exkKu5lqus/YO22Q7NjuK72Yn"
    "dmZXdsuOKt3HXure2VHiRb6sns1X1H+V5/FvfFVvPiuyo9Q5+Vv5u0ZR4kKjKPzQyOeocVTpmsZRIq1xlEpvHIUarKlu1ziK71R3"
    "krvKqcZRzj3qe+Vf8zeNo7TW7fTbuVbYiw+y0YgoccsI940RUWjNit9H4cLvvQ+Pey2PR1UeGeMzNyaq8igfHxPFDzwZhQFPRomB"
    "nP5kFL/Mv/IET7KC33JhURT+pyhKW8QlRc77QBRuO+Bx2YvND0ahxcEoHsXfc8zBKO1pPqeewmmcyWVcxXs+cH/4IIoH8Ff8DYfz"
    "YeYyj5MZ/um8/+la4RhO4B85ldP4OhdxMQsYyl3n5VGcYD024A28kc14E2/ly5zN1sc9/vEoXvV5FN7+PIrPsOI/nuCJKP7mJE+6"
    "730ZhRNfRvGX/IrfsIIX+D3LTkXhyKko7nE6CvefjpLpFVG4tiJKtmRrzuUivs1ClrCUB3iQ3zOci5Jjz0XhKb7APL7ElzmHr/Pt"
    "c9F1X8rhW99C30YhyfpswNvZmm3ZiZ2ZYh/m8ne84bsomfNdFObyb5zPBXyDf+c5fsfv+cN3UfwTw3nfxeej5FV2veDxLkThAQ7g"
    "aD7JcXyaz/EvnM4X+RJncw7n8VUu4VtcynwWcg2LWMwt3MaDPMRj/IzH+Tm/4Ame4mn+mxX8juf5Iwd8HyXzvvd9wD38kIf5JU/z"
    "X/ya5/gdww+e5wc1My56Xy9Gyd4cwF8zl9M5m6tYwCKWcAvL+DHDJcdf8v6zM+9jL4Yfo+SQHz0O/8Dwk/f1svf1apQWQrW4SaiW"
    "lscQVUuriKr5kVTt/wEKWdaQ"
)


def _parse_ranges(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.split():
        a, _, b = part.partition("-")
        out.update(range(int(a, 16), int(b or a, 16) + 1))
    return frozenset(out)


def _ranges_to_class(spec: str) -> str:
    """A regex character class matching the ranges (fast membership tests on whole strings)."""
    items = []
    for part in spec.split():
        a, _, b = part.partition("-")
        items.append(re.escape(chr(int(a, 16))) + ("-" + re.escape(chr(int(b, 16))) if b else ""))
    return "[" + "".join(items) + "]"


_WHITE_SPACE = _parse_ranges(WHITE_SPACE)  # Rust char::is_whitespace
_WS_RE = re.compile(_ranges_to_class(WHITE_SPACE) + "+")

# Grapheme_Cluster_Break values
(_OTHER, _CR, _LF, _CONTROL, _EXTEND, _ZWJ, _RI, _PREPEND, _SPACINGMARK, _L, _V, _T, _LV, _LVT) = range(14)
_INCB_LINKER, _INCB_CONSONANT, _INCB_EXTEND = 1, 2, 3


def _load_grapheme_table() -> tuple[list[int], list[int]]:
    raw = array("I")
    raw.frombytes(zlib.decompress(base64.b64decode(GRAPHEME_BLOB)))
    if sys.byteorder != "little":
        raw.byteswap()
    return [v >> 8 for v in raw], [v & 0xFF for v in raw]


_GB_STARTS, _GB_CODES = _load_grapheme_table()


@lru_cache(maxsize=65536)
def _gb_code(ch: str) -> int:
    return _GB_CODES[bisect_right(_GB_STARTS, ord(ch)) - 1]


def graphemes(text: str) -> list[str]:
    """Extended grapheme clusters (UAX #29 rules GB3-GB13, including GB9c), like unicode-segmentation."""
    n = len(text)
    if n == 0:
        return []
    out = []
    start = 0
    code = _gb_code(text[0])
    prev = code & 15
    ri_run = 1 if prev == _RI else 0
    emoji = 1 if code & 16 else 0  # 1: ExtPict Extend*, 2: ExtPict Extend* ZWJ
    incb_state = 1 if code >> 5 == _INCB_CONSONANT else 0  # 1: Consonant [Ext|Link]*, 2: ... with a Linker
    for i in range(1, n):
        code = _gb_code(text[i])
        cur = code & 15
        incb = code >> 5
        if prev == _CR and cur == _LF:
            brk = False
        elif prev in (_CONTROL, _CR, _LF) or cur in (_CONTROL, _CR, _LF):
            brk = True
        elif prev == _L and cur in (_L, _V, _LV, _LVT):
            brk = False
        elif prev in (_LV, _V) and cur in (_V, _T):
            brk = False
        elif prev in (_LVT, _T) and cur == _T:
            brk = False
        elif cur in (_EXTEND, _ZWJ, _SPACINGMARK) or prev == _PREPEND:
            brk = False
        elif incb == _INCB_CONSONANT and incb_state == 2:
            brk = False
        elif prev == _ZWJ and emoji == 2 and code & 16:
            brk = False
        elif prev == _RI and cur == _RI and ri_run % 2 == 1:
            brk = False
        else:
            brk = True
        if brk:
            out.append(text[start:i])
            start = i
        # update states with the current character
        ri_run = ri_run + 1 if cur == _RI else 0
        if code & 16:
            emoji = 1
        elif cur == _EXTEND and emoji == 1:
            emoji = 1
        elif cur == _ZWJ and emoji == 1:
            emoji = 2
        else:
            emoji = 0
        if incb == _INCB_CONSONANT:
            incb_state = 1
        elif incb == _INCB_LINKER and incb_state:
            incb_state = 2
        elif incb == _INCB_EXTEND and incb_state:
            pass
        else:
            incb_state = 0
        prev = cur
    out.append(text[start:])
    return out


# --------------------------------------------------------------------------------------------------------------
# errors and JSON validation


def _unsupported(path: Path, what: str) -> ModelError:
    return ModelError(
        f"{path}: unsupported tokenizer component: {what}. The engine tokenizer implements only the "
        "Unigram/Precompiled/Metaspace and WordPiece/BertNormalizer/BertPreTokenizer pipelines (plus the "
        "Replace, NFC/NFD/NFKC/NFKD, Lowercase and Strip normalizers); "
        "extend src/actdiff/engine/tokenizer.py or use a model with a supported tokenizer"
    )


def _check_keys(path: Path, obj: dict, allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed - {"type"}
    if extra:
        raise _unsupported(path, f"{where} option(s) {sorted(extra)}")


# --------------------------------------------------------------------------------------------------------------
# normalizers


class _Precompiled:
    """SentencePiece precompiled charsmap, applied like HF tokenizers' ``Precompiled`` normalizer."""

    def __init__(self, path: Path, b64: str):
        try:
            blob = base64.b64decode(b64, validate=True)
        except (ValueError, TypeError) as e:
            raise ModelError(f"{path}: normalizer Precompiled: precompiled_charsmap is not base64 ({e})") from None
        if len(blob) < 4:
            raise ModelError(f"{path}: normalizer Precompiled: precompiled_charsmap is truncated")
        trie_size = int.from_bytes(blob[:4], "little")
        if trie_size % 4 or 4 + trie_size > len(blob) or trie_size == 0:
            raise ModelError(f"{path}: normalizer Precompiled: bad trie size {trie_size} in precompiled_charsmap")
        units = array("I")
        units.frombytes(blob[4 : 4 + trie_size])
        if sys.byteorder != "little":
            units.byteswap()
        self.units = units.tolist()
        self.pool = blob[4 + trie_size :]
        self.path = path
        self._cache: dict[str, str] = {}

    def _lookup(self, key: bytes) -> str | None:
        """Replacement for the shortest trie key that is a prefix of ``key`` (spm_precompiled's ``transform``)."""
        units = self.units
        n = len(units)
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)
        for c in key:
            if c == 0:
                break
            node ^= c
            if node >= n:
                return None
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != c:
                return None
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                if node >= n:
                    return None
                start = units[node] & ((1 << 31) - 1)
                end = self.pool.find(b"\0", start)
                if end < 0:
                    end = len(self.pool)
                try:
                    return self.pool[start:end].decode("utf-8")
                except UnicodeDecodeError:
                    raise ModelError(f"{self.path}: normalizer Precompiled: string pool is not UTF-8") from None
        return None

    def _grapheme(self, g: str) -> str:
        r = self._cache.get(g)
        if r is not None:
            return r
        b = g.encode("utf-8")
        r = self._lookup(b) if len(b) < 6 else None
        if r is None:
            parts = []
            for ch in g:
                t = self._lookup(ch.encode("utf-8"))
                parts.append(ch if t is None else t)
            r = "".join(parts)
        if len(self._cache) < 200_000:
            self._cache[g] = r
        return r

    def __call__(self, text: str) -> str:
        return "".join(self._grapheme(g) for g in graphemes(text))


_BERT_CONTROL_RE = re.compile(_ranges_to_class(BERT_CONTROL))
_BERT_WS_TO_SPACE = {c: " " for c in _WHITE_SPACE}
_BERT_MN = _parse_ranges(BERT_MN)
_NFD_NO_DECOMPOSE = _parse_ranges(NFD_NO_DECOMPOSE)
_NFKD_NO_DECOMPOSE = _parse_ranges(NFKD_NO_DECOMPOSE)
_NFD_CCC_ZERO = _parse_ranges(NFD_CCC_ZERO)
_LOWER = {
    int(k, 16): "".join(chr(int(x, 16)) for x in v.split("+"))
    for k, _, v in (item.partition(":") for item in LOWER_OVERRIDES.split())
}
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_CJK_RE = re.compile("([" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in _CJK_RANGES) + "])")


def _ccc(ch: str) -> int:
    return 0 if ord(ch) in _NFD_CCC_ZERO else unicodedata.combining(ch)


@lru_cache(maxsize=65536)
def _decompose(ch: str, compat: bool = False) -> str:
    # the reference's crate predates these code points' decompositions: it leaves them alone
    if ord(ch) in (_NFKD_NO_DECOMPOSE if compat else _NFD_NO_DECOMPOSE):
        return ch
    return unicodedata.normalize("NFKD" if compat else "NFD", ch)


def _nfd(text: str, compat: bool = False) -> str:
    """Canonical (NFKD: compatibility) decomposition + canonical ordering, with the reference NFD crate's
    Unicode data."""
    if text.isascii():
        return text
    chars = list("".join(_decompose(c, compat) for c in text))
    i = 0
    n = len(chars)
    while i < n:
        if _ccc(chars[i]) == 0:
            i += 1
            continue
        j = i
        while j < n and _ccc(chars[j]) != 0:
            j += 1
        if j - i > 1:
            chars[i:j] = sorted(chars[i:j], key=_ccc)  # stable sort by combining class
        i = j
    return "".join(chars)


# Code points the crate treats as plain starters that never compose: newer characters (its ccc is 0, it has no
# decomposition for them). Composition never crosses a starter that composes with nothing, so Python's NFC can
# run on the stretches between them; 11938 is the one newer composite whose parts are older than the crate's data.
_COMPOSE_BARRIER = _NFD_CCC_ZERO | _NFKD_NO_DECOMPOSE
_COMPOSED_TOO_NEW = re.compile(_ranges_to_class(NFD_NO_DECOMPOSE))


def _compose_run(run: str) -> str:
    out = unicodedata.normalize("NFC", run)
    return _COMPOSED_TOO_NEW.sub(lambda m: unicodedata.normalize("NFD", m.group(0)), out)


def _unicode_normalizer(form: str) -> Callable[[str], str]:
    """NFD / NFKD / NFC / NFKC as HF tokenizers computes them (its crate's older Unicode data)."""
    compat = form in ("NFKD", "NFKC")
    compose = form in ("NFC", "NFKC")

    def normalize(text: str) -> str:
        if text.isascii():
            return text
        text = _nfd(text, compat)
        if not compose:
            return text
        out, start = [], 0
        for i, c in enumerate(text):
            if ord(c) in _COMPOSE_BARRIER:
                out += [_compose_run(text[start:i]), c]
                start = i + 1
        out.append(_compose_run(text[start:]))
        return "".join(out)

    return normalize


def _lowercase(text: str) -> str:
    # per character (no Final_Sigma context), with Rust's newer case mappings
    return text.lower() if text.isascii() else "".join(_LOWER.get(ord(c)) or c.lower() for c in text)


class _Strip:
    """HF ``Strip``: Rust ``char::is_whitespace`` characters off the left and/or right end."""

    def __init__(self, left: bool, right: bool):
        self.left = left
        self.right = right

    def __call__(self, text: str) -> str:
        i, j = 0, len(text)
        while self.left and i < j and text[i] in _WS_CHARS:
            i += 1
        while self.right and j > i and text[j - 1] in _WS_CHARS:
            j -= 1
        return text[i:j]


# Oniguruma (the reference's regex engine) and Python's re agree on literal characters, classes, repetition and
# groups, not on these shorthand classes' Unicode sets (\w takes no combining marks in onig, \d differs on newer
# digits, \b follows \w) or they are onig-only; \s differs on U+001C-U+001F only and is spelt out below.
_ONIG_ONLY_OR_DIFFERENT = frozenset("wWbBdDhHpPRXKyYgk")


def _python_regex(path: Path, pattern: str) -> str:
    r"""``pattern`` with \s / \S as Oniguruma means them (Rust White_Space); unsupported escapes raise."""
    ws_body = _ranges_to_class(WHITE_SPACE)[1:-1]
    out: list[str] = []
    i, class_start = 0, -1  # class_start: index after an open '[' (or '[^'), -1 outside a class
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in _ONIG_ONLY_OR_DIFFERENT or (e == "S" and class_start >= 0):
                what = f"normalizer Replace Regex {pattern!r}: \\{e} (Oniguruma and Python re differ)"
                raise _unsupported(path, what)
            out.append({"s": ws_body if class_start >= 0 else f"[{ws_body}]", "S": f"[^{ws_body}]"}.get(e, c + e))
            i += 2
            continue
        if c == "[" and class_start < 0:
            class_start = i + 2 if pattern.startswith("^", i + 1) else i + 1
        elif c == "[":
            raise _unsupported(path, f"normalizer Replace Regex {pattern!r}: nested character class")
        elif c == "]" and class_start >= 0 and i > class_start:
            class_start = -1
        out.append(c)
        i += 1
    return "".join(out)


class _Replace:
    """HF ``Replace``: every non-overlapping match, left to right, becomes ``content``. A ``String`` pattern is
    literal; a ``Regex`` (Oniguruma in the reference) is compiled with Python's ``re`` after
    :func:`_python_regex`; a pattern either cannot take raises."""

    def __init__(self, path: Path, pattern, content):
        if not isinstance(content, str):
            raise ModelError(f"{path}: normalizer Replace: content must be a string, got {content!r}")
        if not isinstance(pattern, dict) or len(pattern) != 1 or not set(pattern) <= {"String", "Regex"}:
            raise _unsupported(path, f"normalizer Replace pattern {pattern!r} (expected {{String|Regex: ...}})")
        ((kind, value),) = pattern.items()
        if not isinstance(value, str) or not value:
            raise _unsupported(path, f"normalizer Replace {kind} pattern {value!r} (a non-empty string expected)")
        if kind == "String":
            self.regex = re.compile(re.escape(value))
        else:
            try:
                self.regex = re.compile(_python_regex(path, value))
            except re.error as e:
                msg = f"normalizer Replace Regex {value!r} (Python re cannot compile it: {e})"
                raise _unsupported(path, msg) from None
        self.content = content

    def __call__(self, text: str) -> str:
        return self.regex.sub(lambda _: self.content, text)  # content is literal, never a template


class _BertNormalizer:
    def __init__(self, clean_text: bool, handle_chinese_chars: bool, strip_accents: bool, lowercase: bool):
        self.clean_text = clean_text
        self.handle_chinese_chars = handle_chinese_chars
        self.strip_accents = strip_accents
        self.lowercase = lowercase

    def __call__(self, text: str) -> str:
        if self.clean_text:
            text = _BERT_CONTROL_RE.sub("", text).translate(_BERT_WS_TO_SPACE)
        if self.handle_chinese_chars:
            text = _CJK_RE.sub(r" \1 ", text)
        if self.strip_accents:
            text = "".join(c for c in _nfd(text) if ord(c) not in _BERT_MN)
        if self.lowercase:
            text = _lowercase(text)
        return text


# --------------------------------------------------------------------------------------------------------------
# pre-tokenizers: each maps one piece to a list of non-empty pieces


def _whitespace_split(piece: str) -> list[str]:
    return [p for p in _WS_RE.split(piece) if p]


class _Metaspace:
    def __init__(self, replacement: str, prepend: bool, split: bool):
        self.replacement = replacement
        self.prepend = prepend
        self.split = split

    def __call__(self, piece: str) -> list[str]:
        rep = self.replacement
        piece = piece.replace(" ", rep)
        if self.prepend and piece and not piece.startswith(rep):
            piece = rep + piece
        if not self.split:
            return [piece] if piece else []
        out = []
        start = 0
        while True:
            i = piece.find(rep, start + 1)
            if i < 0:
                break
            out.append(piece[start:i])
            start = i
        out.append(piece[start:])
        return [p for p in out if p]


_BERT_PUNCT_RE = re.compile("(" + _ranges_to_class(BERT_PUNCT) + ")")


def _bert_pre_tokenize(piece: str) -> list[str]:
    out = []
    for word in _WS_RE.split(piece):
        if word:
            out.extend(p for p in _BERT_PUNCT_RE.split(word) if p)
    return out


# --------------------------------------------------------------------------------------------------------------
# models: each maps one pre-token to ids


class _Unigram:
    K_UNK_PENALTY = 10.0

    def __init__(self, path: Path, vocab: list, unk_id: int | None):
        self.pieces: dict[str, tuple[int, float]] = {}
        for i, item in enumerate(vocab):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                raise ModelError(f"{path}: model Unigram: vocab entry {i} is not [piece, score]")
            self.pieces.setdefault(item[0], (i, float(item[1])))  # first id wins for a duplicated piece
        if not self.pieces:
            raise ModelError(f"{path}: model Unigram: empty vocab")
        if unk_id is None or not 0 <= unk_id < len(vocab):
            raise _unsupported(path, f"model Unigram with unk_id={unk_id!r} (an unk id inside the vocab is required)")
        self.unk_id = unk_id
        self.min_score = min(float(item[1]) for item in vocab)
        self.max_len = max(len(p) for p in self.pieces)
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        r = self._cache.get(text)
        if r is None:
            r = self._encode(text)
            if len(self._cache) < 100_000:
                self._cache[text] = r
        return r

    def _encode(self, text: str) -> list[int]:
        n = len(text)
        unk_score = self.min_score - self.K_UNK_PENALTY
        best = [0.0] * (n + 1)
        start_of: list[int | None] = [None] * (n + 1)
        ids = [0] * (n + 1)
        pieces = self.pieces
        for s in range(n):
            base = best[s]
            single = False
            for e in range(s + 1, min(n, s + self.max_len) + 1):
                hit = pieces.get(text[s:e])
                if hit is None:
                    continue
                cand = hit[1] + base
                if start_of[e] is None or cand > best[e]:
                    best[e] = cand
                    start_of[e] = s
                    ids[e] = hit[0]
                if e == s + 1:
                    single = True
            if not single:
                cand = unk_score + base
                if start_of[s + 1] is None or cand > best[s + 1]:
                    best[s + 1] = cand
                    start_of[s + 1] = s
                    ids[s + 1] = self.unk_id
        # backtrack; consecutive unks fuse into one string, then strings map to ids
        out: list[str] = []
        fused: list[str] = []
        e = n
        while e > 0:
            s = start_of[e]
            assert s is not None
            if ids[e] == self.unk_id:
                fused.append(text[s:e])
            else:
                if fused:
                    out.append("".join(reversed(fused)))
                    fused = []
                out.append(text[s:e])
            e = s
        if fused:
            out.append("".join(reversed(fused)))
        out.reverse()
        return [pieces[t][0] if t in pieces else self.unk_id for t in out]


class _WordPiece:
    def __init__(self, path: Path, vocab: dict, unk_token: str, prefix: str, max_chars: int):
        if not isinstance(vocab, dict):
            raise ModelError(f"{path}: model WordPiece: vocab must be an object piece -> id")
        self.vocab = vocab
        if unk_token not in vocab:
            raise ModelError(f"{path}: model WordPiece: unk_token {unk_token!r} is not in the vocab")
        self.unk_id = vocab[unk_token]
        self.prefix = prefix
        self.max_chars = max_chars
        self.max_len = max(len(p) for p in vocab)
        self._cache: dict[str, list[int]] = {}

    def __call__(self, word: str) -> list[int]:
        r = self._cache.get(word)
        if r is None:
            r = self._encode(word)
            if len(self._cache) < 100_000:
                self._cache[word] = r
        return r

    def _encode(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk_id]
        out = []
        start = 0
        n = len(word)
        while start < n:
            end = n
            hit = None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = self.prefix + sub
                hit = self.vocab.get(sub)
                if hit is not None:
                    break
                end -= 1
            if hit is None:
                return [self.unk_id]
            out.append(hit)
            start = end
        return out


# --------------------------------------------------------------------------------------------------------------
# the tokenizer


class _AddedToken:
    def __init__(self, path: Path, spec: dict):
        _check_keys(
            path,
            spec,
            {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"},
            "added_tokens entry",
        )
        self.id = spec["id"]
        self.content = spec["content"]
        if not isinstance(self.id, int) or not isinstance(self.content, str) or not self.content:
            raise ModelError(f"{path}: added_tokens entry {spec!r} needs an integer id and a non-empty content")
        if spec.get("single_word"):
            raise _unsupported(path, f"added token {self.content!r} with single_word=true")
        if spec.get("normalized"):
            raise _unsupported(path, f"added token {self.content!r} with normalized=true")
        self.lstrip = bool(spec.get("lstrip"))
        self.rstrip = bool(spec.get("rstrip"))


def _transformers_charsmap(spec) -> dict | None:
    """The normalizer transformers 5 keeps for XLMRobertaTokenizer: the first ``Precompiled`` of the
    tokenizer.json normalizer (alone or in a top-level Sequence); every other normalizer is dropped (e.g. the
    ``Replace(" {2,}", " ")`` multilingual-e5 ships: its WhitespaceSplit makes runs of spaces moot anyway)."""
    if not isinstance(spec, dict):
        return None
    items = spec.get("normalizers") or [] if spec.get("type") == "Sequence" else [spec]
    for item in items:
        if isinstance(item, dict) and item.get("type") == "Precompiled" and "precompiled_charsmap" in item:
            return {"type": "Precompiled", "precompiled_charsmap": item["precompiled_charsmap"]}
    return None


class EngineTokenizer:
    """Pure-Python tokenizer for the engine; ``encode`` returns (ids with special tokens, untruncated length)."""

    def __init__(
        self,
        path: Path,
        added: list[_AddedToken],
        normalizers: list[Callable[[str], str]],
        pre_tokenizers: list[Callable[[str], list[str]]],
        model: Callable[[str], list[int]],
        template: list[int | None],
        description: dict,
    ):
        self.path = path
        self.added = {t.content: t for t in added}
        self._added_re = (
            re.compile("|".join(re.escape(c) for c in sorted(self.added, key=len, reverse=True))) if added else None
        )
        self.normalizers = normalizers
        self.pre_tokenizers = pre_tokenizers
        self.model = model
        self.template = template
        self.n_special = sum(1 for t in template if t is not None)
        self.description = description

    # ---- loading

    @classmethod
    def from_file(cls, path, *, transformers_compat: bool = True) -> EngineTokenizer:
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except FileNotFoundError:
            raise ModelError(f"{path}: tokenizer.json not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: cannot read tokenizer.json ({type(e).__name__}: {e})") from None
        if not isinstance(spec, dict):
            raise ModelError(f"{path}: tokenizer.json must be a JSON object")
        _check_keys(
            path,
            spec,
            {
                "version",
                "truncation",
                "padding",
                "added_tokens",
                "normalizer",
                "pre_tokenizer",
                "model",
                "post_processor",
                "decoder",
            },
            "top-level",
        )
        model_spec = spec.get("model")
        if not isinstance(model_spec, dict):
            raise ModelError(f"{path}: tokenizer.json has no 'model' object")
        normalizer_spec = spec.get("normalizer")
        pre_spec = spec.get("pre_tokenizer")
        description = {"file": str(path), "transformers_compat": None}

        if transformers_compat:
            cfg_path = path.with_name("tokenizer_config.json")
            if cfg_path.is_file():
                try:
                    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ModelError(f"{cfg_path}: cannot read ({type(e).__name__}: {e})") from None
                klass = str(cfg.get("tokenizer_class") or "")
                base = klass[: -len("Fast")] if klass.endswith("Fast") else klass
                if base == "XLMRobertaTokenizer":
                    if model_spec.get("type") != "Unigram":
                        raise _unsupported(path, f"model {model_spec.get('type')!r} for {klass} (expected Unigram)")
                    normalizer_spec = _transformers_charsmap(normalizer_spec)
                    scheme = "always" if cfg.get("add_prefix_space", True) else "never"
                    pre_spec = {
                        "type": "Sequence",
                        "pretokenizers": [
                            {"type": "WhitespaceSplit"},
                            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": True},
                        ],
                    }
                elif base == "BertTokenizer":
                    if model_spec.get("type") != "WordPiece":
                        raise _unsupported(path, f"model {model_spec.get('type')!r} for {klass} (expected WordPiece)")
                    normalizer_spec = {
                        "type": "BertNormalizer",
                        "clean_text": True,
                        "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
                        "strip_accents": cfg.get("strip_accents"),
                        "lowercase": cfg.get("do_lower_case", True),
                    }
                    pre_spec = {"type": "BertPreTokenizer"}
                else:
                    raise _unsupported(
                        path,
                        f"tokenizer_class {klass!r} in {cfg_path} (transformers may rebuild its pipeline; "
                        "known: XLMRobertaTokenizer, BertTokenizer; or load with transformers_compat=False)",
                    )
                description["transformers_compat"] = klass

        added_specs = spec.get("added_tokens") or []
        if not isinstance(added_specs, list):
            raise ModelError(f"{path}: added_tokens must be a list")
        added = [_AddedToken(path, a) for a in added_specs]
        normalizers = cls._build_normalizers(path, normalizer_spec)
        pre_tokenizers = cls._build_pre_tokenizers(path, pre_spec)
        model = cls._build_model(path, model_spec)
        template = cls._build_template(path, spec.get("post_processor"), added, model_spec)
        description.update(
            normalizer=normalizer_spec and normalizer_spec.get("type"),
            pre_tokenizer=pre_spec,
            model=model_spec.get("type"),
        )
        return cls(path, added, normalizers, pre_tokenizers, model, template, description)

    @staticmethod
    def _build_normalizers(path: Path, spec) -> list[Callable[[str], str]]:
        if spec is None:
            return []
        kind = spec.get("type")
        if kind == "Sequence":
            _check_keys(path, spec, {"normalizers"}, "normalizer Sequence")
            out = []
            for sub in spec.get("normalizers") or []:
                out.extend(EngineTokenizer._build_normalizers(path, sub))
            return out
        if kind == "Precompiled":
            _check_keys(path, spec, {"precompiled_charsmap"}, "normalizer Precompiled")
            charsmap = spec.get("precompiled_charsmap")
            if not charsmap:
                return []  # HF: an empty charsmap normalizes nothing
            return [_Precompiled(path, charsmap)]
        if kind == "BertNormalizer":
            _check_keys(
                path,
                spec,
                {"clean_text", "handle_chinese_chars", "strip_accents", "lowercase"},
                "normalizer BertNormalizer",
            )
            lowercase = bool(spec.get("lowercase", True))
            strip = spec.get("strip_accents")
            return [
                _BertNormalizer(
                    clean_text=bool(spec.get("clean_text", True)),
                    handle_chinese_chars=bool(spec.get("handle_chinese_chars", True)),
                    strip_accents=lowercase if strip is None else bool(strip),
                    lowercase=lowercase,
                )
            ]
        simple = EngineTokenizer._simple_normalizer(path, spec)
        if simple is not None:
            return [simple]
        raise _unsupported(path, f"normalizer type {kind!r}")

    @staticmethod
    def _simple_normalizer(path: Path, spec: dict) -> Callable[[str], str] | None:
        """Replace, NFC/NFD/NFKC/NFKD, Lowercase, Strip (HF tokenizers' option names and defaults); None if
        ``spec`` is none of them."""
        kind = spec.get("type")
        if kind == "Replace":
            _check_keys(path, spec, {"pattern", "content"}, "normalizer Replace")
            return _Replace(path, spec.get("pattern"), spec.get("content"))
        if kind in ("NFC", "NFD", "NFKC", "NFKD"):
            _check_keys(path, spec, set(), f"normalizer {kind}")
            return _unicode_normalizer(kind)
        if kind == "Lowercase":
            _check_keys(path, spec, set(), "normalizer Lowercase")
            return _lowercase
        if kind == "Strip":
            _check_keys(path, spec, {"strip_left", "strip_right"}, "normalizer Strip")
            missing = [k for k in ("strip_left", "strip_right") if not isinstance(spec.get(k), bool)]
            if missing:  # tokenizers refuses to load such a file, so the engine does too
                raise ModelError(f"{path}: normalizer Strip: {' and '.join(missing)} must be true or false")
            return _Strip(spec["strip_left"], spec["strip_right"])
        return None

    @staticmethod
    def _build_pre_tokenizers(path: Path, spec) -> list[Callable[[str], list[str]]]:
        if spec is None:
            return []
        kind = spec.get("type")
        if kind == "Sequence":
            _check_keys(path, spec, {"pretokenizers"}, "pre_tokenizer Sequence")
            out = []
            for sub in spec.get("pretokenizers") or []:
                out.extend(EngineTokenizer._build_pre_tokenizers(path, sub))
            return out
        if kind == "WhitespaceSplit":
            _check_keys(path, spec, set(), "pre_tokenizer WhitespaceSplit")
            return [_whitespace_split]
        if kind == "BertPreTokenizer":
            _check_keys(path, spec, set(), "pre_tokenizer BertPreTokenizer")
            return [_bert_pre_tokenize]
        if kind == "Metaspace":
            _check_keys(
                path,
                spec,
                {"replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"},
                "pre_tokenizer Metaspace",
            )
            rep = spec.get("replacement", "\u2581")
            if not isinstance(rep, str) or len(rep) != 1:
                raise _unsupported(path, f"pre_tokenizer Metaspace replacement {rep!r} (one character expected)")
            if "str_rep" in spec and spec["str_rep"] != rep:
                raise _unsupported(path, f"pre_tokenizer Metaspace str_rep {spec['str_rep']!r} != replacement")
            if "prepend_scheme" in spec:
                scheme = spec["prepend_scheme"]
            else:
                scheme = "always" if spec.get("add_prefix_space", True) else "never"
            if scheme not in ("always", "never"):
                raise _unsupported(path, f"pre_tokenizer Metaspace prepend_scheme {scheme!r}")
            return [_Metaspace(rep, scheme == "always", bool(spec.get("split", True)))]
        raise _unsupported(path, f"pre_tokenizer type {kind!r}")

    @staticmethod
    def _build_model(path: Path, spec: dict) -> Callable[[str], list[int]]:
        kind = spec.get("type")
        if kind == "Unigram":
            _check_keys(path, spec, {"unk_id", "vocab", "byte_fallback"}, "model Unigram")
            if spec.get("byte_fallback"):
                raise _unsupported(path, "model Unigram option byte_fallback=true")
            return _Unigram(path, spec.get("vocab") or [], spec.get("unk_id"))
        if kind == "WordPiece":
            _check_keys(
                path,
                spec,
                {"unk_token", "continuing_subword_prefix", "max_input_chars_per_word", "vocab"},
                "model WordPiece",
            )
            return _WordPiece(
                path,
                spec.get("vocab") or {},
                spec.get("unk_token", "[UNK]"),
                spec.get("continuing_subword_prefix", "##"),
                int(spec.get("max_input_chars_per_word", 100)),
            )
        raise _unsupported(path, f"model type {kind!r}")

    @staticmethod
    def _build_template(path: Path, spec, added: list[_AddedToken], model_spec: dict) -> list[int | None]:
        """The single-sequence template as a list: token id, or None where the sequence goes."""
        if spec is None:
            return [None]
        kind = spec.get("type")
        if kind == "TemplateProcessing":
            _check_keys(path, spec, {"single", "pair", "special_tokens"}, "post_processor TemplateProcessing")
            specials = spec.get("special_tokens") or {}
            out: list[int | None] = []
            for item in spec.get("single") or []:
                if "Sequence" in item:
                    if item["Sequence"].get("id") != "A":
                        raise _unsupported(path, f"post_processor TemplateProcessing single item {item!r}")
                    out.append(None)
                elif "SpecialToken" in item:
                    name = item["SpecialToken"].get("id")
                    if name not in specials:
                        raise ModelError(
                            f"{path}: post_processor TemplateProcessing: special token {name!r} "
                            "is not in special_tokens"
                        )
                    out.extend(int(i) for i in specials[name]["ids"])
                else:
                    raise _unsupported(path, f"post_processor TemplateProcessing single item {item!r}")
            if out.count(None) != 1:
                raise _unsupported(path, "post_processor TemplateProcessing single template without exactly one $A")
            return out
        if kind == "BertProcessing":
            _check_keys(path, spec, {"sep", "cls"}, "post_processor BertProcessing")
            return [int(spec["cls"][1]), None, int(spec["sep"][1])]
        raise _unsupported(path, f"post_processor type {kind!r}")

    # ---- encoding

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Split the raw text on added tokens (HF AddedVocabulary.find_matches, lstrip/rstrip included)."""
        if self._added_re is None:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        offset = 0
        for m in self._added_re.finditer(text):
            start, stop = m.start(), m.end()
            tok = self.added[m.group(0)]
            if tok.lstrip:
                j = start
                while j > 0 and text[j - 1] in _WS_CHARS:
                    j -= 1
                start = max(j, offset)
            if tok.rstrip:
                while stop < len(text) and text[stop] in _WS_CHARS:
                    stop += 1
            if offset < start:
                out.append((text[offset:start], None))
            out.append((text[start:stop], tok.id))
            offset = stop
        if offset < len(text):
            out.append((text[offset:], None))
        return out

    def tokenize_ids(self, text: str) -> list[int]:
        """Content ids (no special tokens from the post-processor)."""
        ids: list[int] = []
        for seg, tok_id in self._split_added(text):
            if tok_id is not None:
                ids.append(tok_id)
                continue
            for norm in self.normalizers:
                seg = norm(seg)
            pieces = [seg] if seg else []
            for pre in self.pre_tokenizers:
                pieces = [q for p in pieces for q in pre(p)]
            for p in pieces:
                ids.extend(self.model(p))
        return ids

    def encode(self, text: str, max_length: int | None = None) -> tuple[list[int], int]:
        """(ids including the special tokens, length before truncation). Over-long inputs keep their first
        ``max_length - n_special`` content tokens, like transformers' ``truncation=True`` on one sequence."""
        content = self.tokenize_ids(text)
        untruncated = len(content) + self.n_special
        if max_length is not None:
            if max_length < self.n_special:
                raise ModelError(
                    f"{self.path}: max_length={max_length} leaves no room for the {self.n_special} special tokens"
                )
            content = content[: max_length - self.n_special]
        out: list[int] = []
        for t in self.template:
            if t is None:
                out.extend(content)
            else:
                out.append(t)
        return out, untruncated


_WS_CHARS = frozenset(chr(c) for c in _WHITE_SPACE)
