"""Any prompt: a searchable table of the whole corpus and a drill-down for any prompt, drawn in the page by a few
lines of inline script from data embedded as one JSON block (no CDN, no network).

The data is the run's summary ``prompt_table`` (one row per prompt, compare.prompt_table) with its numbers
rounded (key-node errors to 1/20 of a decade, ±6 %, as short integers; cosines to 8 digits; first divergences
as an index into their list), and the first values of the key nodes for the worst
prompts (summary ``drilldown``): the only prompts whose values a run keeps. The table rows are built by the script
(at most ``SHOWN`` at a time), not written into the page, so a page grows by about 300 bytes per prompt
(README "Any prompt"). Raw HTML printed by an ``output: asis`` cell: no blank line and no indented line inside
it, so pandoc passes it through as one raw block.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

SHOWN = 200  # table rows drawn at once; the search narrows the rest down
# bytes of embedded data at most: the page without it is about 1 MB and must stay under 5 MB (issue 18)
EMBED_BUDGET = 3 * 2**20
VALUES = 4  # first values shown per key node (reference, engine, difference)
COLUMNS = ["id", "text", "tokens", "first", "failing", "cosine", "err", "layers", "agree", "flips"]


def _num(v, digits: int = 2) -> str:
    """A JSON number with ``digits`` significant digits, as short as possible ("1.2e-7", "0", "null")."""
    if v is None or not math.isfinite(float(v)):
        return "null"
    if v == 0:
        return "0"
    s = f"{float(v):.{digits - 1}e}"
    mant, exp = s.split("e")
    mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
    e = int(exp)
    if -3 <= e < 3:  # plain notation is shorter here
        return f"{float(v):.{digits}g}"
    return f"{mant}e{e}"


def _nums(values, digits: int = 2) -> str:
    return "[" + ",".join(_num(v, digits) for v in values) + "]"


STEPS_PER_DECADE, CODE_OFFSET = 20, 400  # a key-node error is embedded as round(20 log10(e)) + 400


def error_code(v) -> str:
    """A relative L2 as a short integer: 0 exactly 0, ``null`` not measured, else its log in 1/20 decade steps
    (3 characters where "1.2e-7" takes 6: the bulk of a row; rounding within ±6 %, 10^(1/40))."""
    if v is None or not math.isfinite(float(v)):
        return "null"
    if v <= 0:
        return "0"
    return str(max(1, round(STEPS_PER_DECADE * math.log10(float(v))) + CODE_OFFSET))


def decode_error(c):
    """The inverse of error_code (as the page's script computes it)."""
    return None if c is None else 0.0 if c == 0 else 10 ** ((c - CODE_OFFSET) / STEPS_PER_DECADE)


def _row_json(r, first_index: dict[str, int], keep: list[int]) -> str:
    first = first_index[r.first_divergence or ""]  # an index into "firsts": a node name per row costs 30 bytes
    scalars = json.dumps([r.prompt_id, r.text, int(r.tokens), first, int(r.failing_nodes)],
                         ensure_ascii=False, separators=(",", ":"))  # fmt: skip
    agree = [float(a) for a in r.routing_agreement]
    ints = lambda xs: "[" + ",".join(str(int(x)) for x in xs) + "]"  # noqa: E731
    errors = "[" + ",".join(error_code(r.key_rel_l2[i]) for i in keep) + "]"
    rest = [_num(r.embedding_cosine, 8), errors, ints(r.routing_layers), _nums(agree, 3), ints(r.routing_flips)]
    return scalars[:-1] + "," + ",".join(rest) + "]"


def _values(drilldown: pd.DataFrame, key_nodes: list[str]) -> dict[str, list]:
    """prompt -> [[key node position, reference, engine, difference], ...] for the prompts the run kept values of."""
    pos = {n: i for i, n in enumerate(key_nodes)}
    out: dict[str, list] = {}
    for r in drilldown.itertuples():
        if r.node not in pos:
            continue
        ref, eng = np.asarray(r.ref_first, np.float64)[:VALUES], np.asarray(r.eng_first, np.float64)[:VALUES]
        k = min(len(ref), len(eng))
        out.setdefault(r.prompt_id, []).append(
            [pos[r.node], [float(f"{v:.6g}") for v in ref[:k]], [float(f"{v:.6g}") for v in eng[:k]],
             [float(f"{v:.2g}") for v in eng[:k] - ref[:k]]]  # fmt: skip
        )
    return out


def thinned(n: int, stride: int) -> list[int]:
    """Every ``stride``-th of ``n`` key-node positions, the first and the last always among them (the embedding
    input and the model's output bracket the error along the graph)."""
    keep = list(range(0, n, stride))
    return keep if not n or keep[-1] == n - 1 else [*keep, n - 1]


def panel_json(table: pd.DataFrame, key_nodes: list[str], drilldown: pd.DataFrame, max_bytes: int | None = None) -> str:
    """The embedded data: key node names, column names, one array per prompt, the kept values. '<' is escaped
    (inside JSON strings only), so no text can close the script element.

    Size guard: the per-prompt errors at every key node are the bulk of a row and grow with the model's depth (a
    12-layer model has about twice a 6-layer one's key nodes). When the data would exceed ``max_bytes``
    (EMBED_BUDGET), the rows keep every k-th key node (the smallest k that fits; first and last always kept) and
    the data says so (``stride``, shown above the table); every prompt stays in the table."""
    firsts = sorted(set(table["first_divergence"].fillna("")) | {""})
    first_index = {n: i for i, n in enumerate(firsts)}
    stride = 1
    while True:
        keep = thinned(len(key_nodes), stride)
        text = _encode(table, [key_nodes[i] for i in keep], keep, first_index, firsts, drilldown, stride)
        if max_bytes is None or len(text.encode("utf-8")) <= max_bytes or len(keep) <= 2:
            return text
        stride += 1


def _encode(table, nodes, keep, first_index, firsts, drilldown, stride: int) -> str:
    rows = ",".join(_row_json(r, first_index, keep) for r in table.itertuples())
    head = {"nodes": nodes, "firsts": firsts, "columns": COLUMNS, "shown": SHOWN, "stride": stride,
            "code": [STEPS_PER_DECADE, CODE_OFFSET], "values": _values(drilldown, nodes),
            "values_for": int(drilldown["prompt_id"].nunique()) if len(drilldown) else 0}  # fmt: skip
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"rows":[' + rows + "]}"
    return text.replace("<", "\\u003c")


STYLE = (
    "<style>#actdiff-prompts input{width:100%;max-width:32rem;padding:.3rem;font-size:1rem}"
    "#actdiff-prompt-table tbody tr{cursor:pointer}#actdiff-prompt-table tbody tr:hover{background:#eef3f9}"
    ".pbar{display:inline-block;height:.7rem;background:#2f6fb3;vertical-align:middle}"
    "#actdiff-prompt-panel{border:1px solid #d7dee8;border-radius:6px;padding:.4rem .8rem;margin:.6rem 0}</style>"
)

# the table and the panel, drawn from the JSON; row click or URL hash #prompt=ID opens a prompt
SCRIPT = r"""<script>(function(){
var D=JSON.parse(document.getElementById('actdiff-prompts-data').textContent),C={};
D.columns.forEach(function(c,i){C[c]=i});
var q=document.getElementById('actdiff-prompt-search'),tb=document.querySelector('#actdiff-prompt-table tbody');
var cnt=document.getElementById('actdiff-prompt-count'),P=document.getElementById('actdiff-prompt-panel'),byId={};
D.rows.forEach(function(r){byId[r[0]]=r;r[C.first]=D.firsts[r[C.first]];
r[C.err]=r[C.err].map(function(c){return c===null?null:c===0?0:Math.pow(10,(c-D.code[1])/D.code[0])})});
function e(s){return String(s).replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/"/g,'&quot;')}
function f(v){return v===null?'–':v===0?'0':Math.abs(v)>=1e-3?String(+v.toPrecision(3)):v.toExponential(1)}
function cos(v){return v===null?'–':String(v)}
function code(s){return '<code>'+e(s)+'</code>'}
function td(h){return '<td>'+h+'</td>'}
function list(){var s=q.value.trim().toLowerCase(),m=D.rows.filter(function(r){
return !s||r[0].toLowerCase().indexOf(s)>=0||r[1].toLowerCase().indexOf(s)>=0});
cnt.textContent=m.length+' of '+D.rows.length+' prompts'
+(D.stride>1?' (errors shown at 1 key node in '+D.stride+', first and last kept: page size budget)':'')
+(m.length>D.shown?' (the first '+D.shown+' shown: refine the search)':'');
tb.innerHTML=m.slice(0,D.shown).map(function(r){return '<tr data-prompt="'+e(r[0])+'">'+td(code(r[0]))
+td(e(r[C.text]))+td(r[C.tokens])+td(code(r[C.first]||'(none)'))+td(r[C.failing])+td(cos(r[C.cosine]))
+'</tr>'}).join('')}
function bar(v){var w=v>0?Math.max(1,Math.min(160,(Math.log10(v)+9)*16)):0;
return '<span class="pbar" style="width:'+w+'px"></span>'}
function errors(r){var V={},kept=D.values[r[0]];(kept||[]).forEach(function(x){V[x[0]]=x});
var h='<table><thead><tr><th>key node</th><th>rel L2</th><th></th>'
+(kept?'<th>reference</th><th>engine</th><th>difference</th>':'')+'</tr></thead><tbody>';
D.nodes.forEach(function(n,i){var v=V[i],x=r[C.err][i];h+='<tr>'+td(code(n))+td(f(x))+td(bar(x));
if(kept)h+=v?td(code(v[1].join(' ')))+td(code(v[2].join(' ')))+td(code(v[3].map(f).join(' '))):td('')+td('')+td('');
h+='</tr>'});
return h+'</tbody></table>'+(kept?'':'<p>Values are kept for the '+D.values_for+' worst prompts only '
+'(Worst inputs); this prompt is not among them, so only its errors are shown.</p>')}
function routing(r){if(!r[C.layers].length)return '<p>No MoE layer: no routing.</p>';
return '<p>Routing of its '+r[C.tokens]+' tokens: '+r[C.layers].map(function(l,i){return 'layer '+l+': '
+(100*r[C.agree][i]).toFixed(1)+' % agree, '+r[C.flips][i]+' flipped'}).join('; ')+'.</p>'}
function open(id){var r=byId[id];if(!r){P.innerHTML='<p>No prompt '+code(id)+' in this run.</p>';return}
P.innerHTML='<h4>'+e(r[0])+'</h4><p>'+e(r[C.text])+'</p><p>tokens '+r[C.tokens]+' · first divergence '
+code(r[C.first]||'(none)')+' · failing nodes '+r[C.failing]+' · final cosine '+cos(r[C.cosine])+'</p>'
+'<p>Error along the graph (propagated relative L2 at each key node, log bar):</p>'+errors(r)+routing(r)}
q.addEventListener('input',list);
tb.addEventListener('click',function(ev){var tr=ev.target.closest('tr');
if(tr)location.hash='prompt='+encodeURIComponent(tr.getAttribute('data-prompt'))});
function fromHash(){var m=/^#prompt=(.+)$/.exec(location.hash);if(m)open(decodeURIComponent(m[1]))}
window.addEventListener('hashchange',fromHash);list();fromHash();
})();</script>"""


def panel_html(table: pd.DataFrame, key_nodes: list[str], drilldown: pd.DataFrame) -> str:
    """The search box, the table, the panel, the data and the script: one raw HTML block (no blank lines)."""
    head = "".join(f"<th>{h}</th>" for h in ("id", "text", "tokens", "first divergence", "failing nodes",
                                             "final cosine"))  # fmt: skip
    return "\n".join(
        [
            '<div id="actdiff-prompts">',
            STYLE,
            '<input id="actdiff-prompt-search" type="search" placeholder="search prompt id or text" '
            'aria-label="search prompts">',
            '<p id="actdiff-prompt-count"></p>',
            '<div id="actdiff-prompt-panel">Click a prompt (or open the page at #prompt=ID).</div>',
            f'<table id="actdiff-prompt-table"><thead><tr>{head}</tr></thead><tbody></tbody></table>',
            '<script type="application/json" id="actdiff-prompts-data">'
            + panel_json(table, key_nodes, drilldown, EMBED_BUDGET)
            + "</script>",
            SCRIPT,
            "</div>",
        ]
    )
