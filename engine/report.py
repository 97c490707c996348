"""``treesynth report``: one self-contained HTML page about a run, read from its store.

The page needs nothing but the file: CSS inline, no script, the tree folds
with native ``<details>``, the leaf-size chart is inline SVG. It names no
external address, so it reads the same offline. Everything that came from
the model or the user (samples, dimensions, values, reasons, the task) is
HTML-escaped; URL schemes, ``url(`` and ``@`` in such text are written as
character references, so even a sample that quotes an address leaves no
address in the file. The same store always gives the same bytes: nothing
depends on the clock or on dict order.

Diversity is computed from the embeddings the run stored with its kept
samples (``samples.vector``), with ``engine/diversity.py``'s definitions:
mean pairwise cosine similarity, and the share of samples with cosine >=
0.95 to an EARLIER sample in export order; beyond ``DEFAULT_MAX_EMBED``
samples, over its seeded subset (seed 0), as ``treesynth diversity`` does."""

from __future__ import annotations

import html
import json
import math
import re
from statistics import median
from typing import Any


from treesynth.engine.diversity import DEFAULT_COSINE_NEAR, StoredDiversity, stored_diversity
from treesynth.engine.export import is_finished
from treesynth.store import Run, Store, reports
from treesynth.store.keys import canonical_json

SAMPLES_PER_LEAF = 3
LEAF_STATES = ("leaf", "planned", "done")
MAX_FIELD_CHARS = 1500  # a longer field is cut in the page (the store and the export keep it whole)
OPEN_SAMPLES_UP_TO = 40  # samples shown in the whole tree up to which they start unfolded


# -- escaping ----------------------------------------------------------------------


_URL_CALL = re.compile(r"url\(", re.IGNORECASE)


def esc(value: Any) -> str:
    """Text for HTML content or a quoted attribute; no address survives as one."""
    text = html.escape(str(value), quote=True)
    text = text.replace("://", "&#58;//").replace("@", "&#64;")
    return _URL_CALL.sub(lambda m: m.group(0)[:3] + "&#40;", text)


# -- diversity from stored vectors -----------------------------------------------------


# -- the page ----------------------------------------------------------------------------


def report_html(store: Store) -> str:
    """The whole report page for one store."""
    from treesynth.engine.baseline import baseline_mark

    run = store.run()
    config = run.config
    counts = store.counts()
    nodes = reports.nodes(store)
    parts = [
        _HEAD.format(title=esc(f"TreeSynth report: {config.get('description', '')}"), css=_CSS),
        _header(store, run, counts, baseline_mark(store)),
        '<section id="tree"><h2>Tree</h2>',
        _tree(nodes, reports.first_samples(store, SAMPLES_PER_LEAF), _field_order(config)),
        "</section>",
        _leaf_sizes(nodes),
        _calls(reports.usage_by_role(store), reports.sessions(store)),
        _dropped(store.dropped_reasons()),
        _diversity(stored_diversity(store)),
        "</main></body></html>\n",
    ]
    return "\n".join(parts)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body><main>"""

_CSS = """
body{margin:0;background:#f6f7f9;color:#1d2430;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #d5dae2}
h3{font-size:15px;margin:16px 0 6px}
.task{font-size:17px;margin:0 0 14px;color:#2c3e66}
table{border-collapse:collapse;background:#fff;border:1px solid #d5dae2}
th,td{padding:4px 12px;text-align:left;border-bottom:1px solid #e7eaf0;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;border-top:2px solid #d5dae2}
.facts th{color:#5a6577;font-weight:500;white-space:nowrap}
.badge{display:inline-block;padding:0 8px;border-radius:9px;font-size:12px;font-weight:600;line-height:18px;vertical-align:1px}
.yes{background:#d9f2e0;color:#1c6b35}.no{background:#fde7c8;color:#8a4b00}
.s-split{background:#e3e9f7;color:#2c3e66}.s-done{background:#d9f2e0;color:#1c6b35}
.s-leaf,.s-planned{background:#fde7c8;color:#8a4b00}.s-open,.s-pivoted,.s-criterion{background:#eceef2;color:#4a5468}
.tree,.tree ul{list-style:none;margin:0;padding:0}
.tree ul{margin-left:10px;padding-left:16px;border-left:1px dashed #c3cad6}
.tree li{margin:4px 0}
summary{cursor:pointer}
.node>details>summary{padding:3px 8px;border-radius:5px;background:#fff;border:1px solid #dde2ea}
.label{font-weight:600}
.counts{color:#3d4a5f;margin-left:6px;font-variant-numeric:tabular-nums}
.body{margin:4px 0 6px 18px;font-size:14px}
.split{margin:2px 0}
.value{display:inline-block;background:#eef1f6;border-radius:4px;padding:0 6px;margin:1px 2px}
.reason{margin:2px 0;color:#8a4b00}
.key{color:#8a93a3;font:12px ui-monospace,"DejaVu Sans Mono",monospace}
.samples>summary{color:#2c3e66;font-size:13px}
.samples ol{margin:4px 0;padding-left:22px}
.samples li{background:#fff;border:1px solid #e3e7ee;border-radius:5px;padding:4px 8px;margin:4px 0}
.samples dl{margin:0}.samples dt{float:left;clear:left;color:#5a6577;margin-right:6px}
.samples dd{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.note{color:#5a6577;font-size:13px;margin:6px 0}
svg text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#3d4a5f}
.grid{display:flex;flex-wrap:wrap;gap:12px 36px;align-items:flex-start}
"""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.1f}"


def _header(store: Store, run: Run, counts: dict[str, Any], baseline: int | None) -> str:
    config = run.config
    model = run.model
    states: dict[str, int] = counts["states"]
    finished = is_finished(states)
    leaves = sum(states.get(s, 0) for s in LEAF_STATES)
    kind = "tree run" if baseline is None else f"baseline (temperature sampling from the root prompt, {baseline} samples)"
    asked = f" of {config['samples']} asked for" if config.get("samples") else ""
    parameters = ", ".join(
        f"{name.replace('_', ' ')} {config[name]}"
        for name in ("depth", "pivots", "samples", "leaf_samples", "max_values", "infinite_samples")
        if config.get(name) is not None
    )
    rows = [
        ("store", esc(store.path)),
        ("kind", esc(kind)),
        ("model", esc(model.get("file", model.get("backend", canonical_json(model))))),
        ("seed", esc(run.seed)),
        ("parameters", esc(parameters)),
        ("made by", esc(f"treesynth {run.treesynth_version or '?'}, created {run.created or '?'}")),
        ("finished", f'<span class="badge {"yes" if finished else "no"}">{"yes" if finished else "no"}</span>'
         + ("" if finished else ' <span class="note">rerun the same command to continue it</span>')),
        ("nodes", esc(f"{sum(states.values())} ({states.get('split', 0)} split, {leaves} leaves, {states.get('done', 0)} leaves done)")),
        ("samples", esc(f"{counts['samples']} kept{asked}")),
        ("model calls", esc(f"{counts['calls']} ({counts['tokens']:,} tokens, {_fmt_seconds(counts['model_seconds'])} s of model time, {_plural(counts['sessions'], 'session')})")),
    ]
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return (
        '<header><h1>TreeSynth report</h1>'
        f'<p class="task">{esc(config.get("description", ""))}</p>'
        f'<table class="facts">{body}</table></header>'
    )


# -- tree ----------------------------------------------------------------------------------


def node_label(node: reports.NodeRow) -> str:
    """A node's name in the tree: its attribute, as `treesynth tree` writes it."""
    if not node.path:
        return "(root)"
    dimension, value = node.path[-1]
    if isinstance(value, list):
        return f"{dimension} ∈ {{{len(value)} values}}"
    return f"{dimension} = {value}"


def leaf_counts_text(node: reports.NodeRow) -> str:
    """kept/target kept, N dropped: the counts a leaf shows."""
    kept = f"{node.kept}/{node.target}" if node.target is not None else f"{node.kept}"
    return f"{kept} kept, {node.dropped} dropped"


def _field_order(config: dict[str, Any]) -> list[str]:
    schema = config.get("sample_schema") or {}
    return list(schema.get("properties") or {})


def _tree(nodes: list[reports.NodeRow], samples: dict[str, list[str]], fields: list[str]) -> str:
    if not nodes:
        return '<p class="note">No node yet: the run has not started its tree.</p>'
    keys = {n.key for n in nodes}
    children: dict[str | None, list[reports.NodeRow]] = {}
    for node in nodes:
        parent = node.parent if node.parent in keys else None
        children.setdefault(parent, []).append(node)
    open_samples = sum(len(v) for v in samples.values()) <= OPEN_SAMPLES_UP_TO
    out: list[str] = ['<ul class="tree">']

    def walk(node: reports.NodeRow) -> None:
        is_leaf = node.state in LEAF_STATES
        state = node.state if node.state != "done" else "leaf, done"
        counts = f'<span class="counts">{esc(leaf_counts_text(node))}</span>' if is_leaf else ""
        out.append(
            f'<li class="node"><details open><summary><span class="label">{esc(node_label(node))}</span> '
            f'<span class="badge s-{esc(node.state)}">{esc(state)}</span>{counts}</summary><div class="body">'
        )
        if node.path and isinstance(node.path[-1][1], list):
            values = "".join(f'<span class="value">{esc(v)}</span>' for v in node.path[-1][1])
            out.append(f'<p class="split">each sample draws one of {len(node.path[-1][1])} values: {values}</p>')
        if node.dimension:
            values = node.values or []
            if node.state == "split":
                shown = "".join(f'<span class="value">{esc(v)}</span>' for v in values)
                how = (
                    f"infinite ({len(values)} values, more than max values): one child draws from them"
                    if node.infinite
                    else f"{len(values)} values"
                )
                out.append(f'<p class="split">split on <b>{esc(node.dimension)}</b>, {esc(how)}: {shown}</p>')
            else:
                out.append(f'<p class="split">criterion chosen: <b>{esc(node.dimension)}</b> (coverage not done yet)</p>')
        if node.reason:
            out.append(f'<p class="reason">became a leaf early: {esc(node.reason)}</p>')
        out.append(f'<div class="key">{esc(node.key)}</div>')
        if is_leaf:
            out.append(_samples(node, samples.get(node.key, []), fields, open_samples))
        kids = children.get(node.key, [])
        if kids:
            out.append("<ul>")
            for kid in kids:
                walk(kid)
            out.append("</ul>")
        out.append("</div></details></li>")

    for root in children.get(None, []):
        walk(root)
    out.append("</ul>")
    return "\n".join(out)


def _samples(node: reports.NodeRow, datas: list[str], fields: list[str], open_: bool) -> str:
    if not datas:
        if node.target == 0:
            return '<p class="note">no sample asked of this leaf (fewer samples asked for than leaves)</p>'
        return '<p class="note">no kept sample yet</p>'
    items = []
    for data in datas:
        sample = json.loads(data)
        names = [f for f in fields if f in sample] + [f for f in sample if f not in fields]
        rows = "".join(f"<dt>{esc(name)}</dt><dd>{esc(_field_text(sample[name]))}</dd>" for name in names)
        items.append(f"<li><dl>{rows}</dl></li>")
    if node.kept > len(datas):
        what = f"first {len(datas)} of {node.kept} samples"
    else:
        what = "its sample" if len(datas) == 1 else f"its {len(datas)} samples"
    return f'<details class="samples"{" open" if open_ else ""}><summary>{what}</summary><ol>{"".join(items)}</ol></details>'


def _field_text(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " …"


# -- leaf sizes --------------------------------------------------------------------------------


def _leaf_sizes(nodes: list[reports.NodeRow]) -> str:
    sizes = [n.kept for n in nodes if n.state in LEAF_STATES]
    head = '<section id="leaf-sizes"><h2>Leaf sizes</h2>'
    if not sizes:
        return head + '<p class="note">No leaf yet.</p></section>'
    targets = sorted({n.target for n in nodes if n.state in LEAF_STATES and n.target is not None})
    target = f"; target per leaf: {', '.join(map(str, targets))}" if targets else ""
    summary = (
        f"{len(sizes)} leaves; kept samples per leaf: min {min(sizes)}, median {median(sizes):g}, "
        f"mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}{target}"
    )
    return head + f'<p class="note">{esc(summary)}</p>' + histogram_svg(sizes) + "</section>"


def histogram_svg(sizes: list[int]) -> str:
    """Leaves per kept-sample count: one bar per count up to 30, else 20 equal bins."""
    top = max(sizes)
    width = 1 if top < 30 else math.ceil((top + 1) / 20)
    bins = [0] * (top // width + 1)
    for size in sizes:
        bins[size // width] += 1
    chart_h, left, bottom, pad, above = 150, 40, 34, 10, 18  # above: room for the tallest bar's count
    base = above + chart_h  # the y of the axis
    chart_w = min(640, left + pad + 56 * len(bins))  # a few bins stay bars, not slabs
    chart_w = max(chart_w, 240)
    bar_w = (chart_w - left - pad) / len(bins)
    peak = max(bins)
    out = [f'<svg role="img" aria-label="leaves per kept-sample count" width="{chart_w}" height="{base + bottom}" viewBox="0 0 {chart_w} {base + bottom}">']
    out.append(f'<line x1="{left}" y1="{base}" x2="{chart_w - pad}" y2="{base}" stroke="#8a93a3"/>')
    label_every = max(1, math.ceil(len(bins) / 16))
    for i, count in enumerate(bins):
        low, high = i * width, i * width + width - 1
        name = f"{low}" if width == 1 else f"{low}–{high}"
        h = 0 if peak == 0 else chart_h * count / peak
        x = left + i * bar_w
        if count:
            out.append(
                f'<rect x="{x + 1:.1f}" y="{base - h:.1f}" width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="#5b7bd5">'
                f"<title>{count} leaves with {name} kept samples</title></rect>"
            )
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base - h - 3:.1f}" text-anchor="middle">{count}</text>')
        if i % label_every == 0:
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{base + 14}" text-anchor="middle">{name}</text>')
    out.append(f'<text x="{left + (chart_w - left) / 2:.0f}" y="{base + 30}" text-anchor="middle">kept samples in the leaf</text>')
    out.append(f'<text x="12" y="{above + chart_h / 2:.0f}" text-anchor="middle" transform="rotate(-90 12 {above + chart_h / 2:.0f})">leaves</text>')
    out.append("</svg>")
    return "".join(out)


# -- calls, dropped, diversity -------------------------------------------------------------------


def _usage_cells(u: reports.Usage) -> str:
    return (
        f'<td class="n">{u.calls:,}</td><td class="n">{u.completion_tokens:,}</td>'
        f'<td class="n">{u.prompt_tokens:,}</td><td class="n">{_fmt_seconds(u.seconds)}</td>'
    )


_USAGE_HEAD = '<th class="n">calls</th><th class="n">tokens out</th><th class="n">tokens in</th><th class="n">model s</th>'


def _calls(roles: list[reports.Usage], sessions: list[reports.SessionRow]) -> str:
    out = ['<section id="calls"><h2>Model calls</h2><div class="grid"><div><h3>By role</h3>']
    if roles:
        total = reports.Usage(
            "total", sum(r.calls for r in roles), sum(r.completion_tokens for r in roles),
            sum(r.prompt_tokens for r in roles), sum(r.seconds for r in roles),
        )
        rows = "".join(f"<tr><td>{esc(r.name)}</td>{_usage_cells(r)}</tr>" for r in roles)
        out.append(f'<table><tr><th>role</th>{_USAGE_HEAD}</tr>{rows}<tr class="total"><td>total</td>{_usage_cells(total)}</tr></table>')
    else:
        out.append('<p class="note">No model call yet.</p>')
    out.append("</div><div><h3>By session</h3>")
    if sessions:
        rows = []
        for s in sessions:
            if s.id is None:
                rows.append(f'<tr><td colspan="4">calls of no recorded session</td>{_usage_cells(s.usage)}</tr>')
                continue
            kind = "resumed" if s.resumed else "new"
            rows.append(f"<tr><td>{s.id}</td><td>{esc(s.started or '')}</td><td>{esc(s.command)}</td><td>{kind}</td>{_usage_cells(s.usage)}</tr>")
        out.append(f"<table><tr><th>#</th><th>started</th><th>command</th><th>kind</th>{_USAGE_HEAD}</tr>{''.join(rows)}</table>")
        out.append(
            '<p class="note">Calls sent in each session. A resumed session replays the calls earlier '
            "sessions committed from the store instead of sending them again; those are not counted twice.</p>"
        )
    else:
        out.append('<p class="note">No session recorded.</p>')
    out.append("</div></div></section>")
    return "".join(out)


def _dropped(reasons: dict[str, int]) -> str:
    head = '<section id="dropped"><h2>Dropped samples</h2>'
    if not reasons:
        return head + '<p class="note">None dropped.</p></section>'
    rows = "".join(f'<tr><td>{esc(why)}</td><td class="n">{n:,}</td></tr>' for why, n in reasons.items())
    total = sum(reasons.values())
    return head + f'<table><tr><th>reason</th><th class="n">samples</th></tr>{rows}<tr class="total"><td>total</td><td class="n">{total:,}</td></tr></table></section>'


def _diversity(d: StoredDiversity) -> str:
    head = '<section id="diversity"><h2>Diversity</h2>'
    if d.cosine is None:
        why = (
            "the store holds no sample embeddings (made by an older treesynth)"
            if d.with_vector == 0 and d.samples
            else "fewer than two kept samples with a stored embedding"
            if d.with_vector < 2
            else "the stored embeddings differ in size"
        )
        return head + f'<p>Mean pairwise cosine similarity and near duplicates: <b>not computed</b> ({esc(why)}).</p></section>'
    over = f"all {d.embedded}" if d.embedded == d.with_vector else f"a seeded random {d.embedded} of {d.with_vector} (seed 0)"
    missing = "" if d.with_vector == d.samples else f"; {d.samples - d.with_vector} samples have no stored embedding"
    rows = (
        f'<tr><td>mean pairwise cosine similarity (lower = more diverse)</td><td class="n">{d.cosine:.3f}</td></tr>'
        f'<tr><td>near duplicates (cosine &gt;= {DEFAULT_COSINE_NEAR:g} to an earlier sample)</td>'
        f'<td class="n">{100 * d.near_duplicates:.1f} %</td></tr>'
    )
    note = (
        f"Over {esc(over)} kept samples with the embedding the run stored for each (by the sentence embedder that "
        f"judged them), in export order{esc(missing)}. The definitions are those of <code>treesynth diversity</code>."
    )
    return head + f'<table>{rows}</table><p class="note">{note}</p></section>'
