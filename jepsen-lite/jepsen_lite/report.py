"""A self-contained HTML timeline of a checked history (inline CSS, SVG and JS).

Layout: one horizontal lane per process, time running left to right; every client
op is a bar from invocation to completion, coloured by outcome (ok green, fail
pink, info orange running to the end of the history, since a crashed op stays
concurrent with everything after it).  Nemesis fault windows (``start-X`` to
``stop-X``) are shaded across all lanes.  For every key that is not linearizable
the bars of its longest linearizable prefix are outlined and numbered in
linearization order, and the op that could not be placed is marked with ✗; a
section per violating key lists the same in text with the model state reached.

Stable hooks (tests and tooling rely on them): ``g.lane[data-process]``,
``rect.op[data-op-id][data-key][data-outcome]``, ``rect.linearized[data-lin-order]``,
``rect.stuck``, ``.stuck-marker``, ``rect.nemesis``, ``section.violation[data-key]``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from jepsen_lite.checker import CheckResult
from jepsen_lite.checker.models import Model, ModelError, get_model
from jepsen_lite.history import Op, Operation, nemesis_intervals

__all__ = ["render_timeline", "write_timeline"]

LANE_H: Final = 24
BAR_H: Final = 14
LEFT: Final = 90
TOP: Final = 26
MIN_W: Final = 1100
MAX_W: Final = 24_000


@dataclass(frozen=True, slots=True)
class _Bar:
    invoke: Op
    complete: Op | None  # None: never completed

    @property
    def outcome(self) -> str:
        return "info" if self.complete is None else self.complete.type


def _bars(ops: Sequence[Op]) -> list[_Bar]:
    """Pair events per process for display (keeps fails and crashed reads, unlike
    the checker's pairing, and tolerates malformed histories)."""
    pending: dict[Any, Op] = {}
    bars: list[_Bar] = []
    for ev in ops:
        if ev.is_nemesis:
            continue
        if ev.type == "invoke":
            prev = pending.pop(ev.process, None)
            if prev is not None:
                bars.append(_Bar(prev, None))
            pending[ev.process] = ev
        else:
            inv = pending.pop(ev.process, None)
            if inv is not None:
                bars.append(_Bar(inv, ev))
    bars.extend(_Bar(inv, None) for inv in pending.values())
    return bars


def _key_str(key: Hashable) -> str:
    return "" if key is None else (json.dumps(key) if not isinstance(key, str) else key)


def _fmt(v: Any) -> str:
    return "nil" if v is None else json.dumps(v, default=str)


def _describe(bar: _Bar, model: Model | None) -> str:
    inv, comp = bar.invoke, bar.complete
    if model is not None:
        op = Operation(
            inv.index,
            inv.process,
            inv.f,
            inv.key,
            inv.value,
            comp.value if comp is not None else None,
            inv.time,
            comp.time if comp is not None and comp.type != "info" else None,
        )
        try:
            text = model.describe_op(op)
        except Exception:  # a report must not fail on an op the model rejects
            text = f"{inv.f}({_fmt(inv.value)})"
    else:
        text = f"{inv.f}({_fmt(inv.value)})"
    tail = bar.outcome if comp is None or comp.error is None else f"{bar.outcome}: {comp.error}"
    return (
        f"op {inv.index} · process {inv.process} · key {_key_str(inv.key) or '-'} · {text} · {tail}"
    )


_CSS: Final = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 6px}
.verdict{display:inline-block;padding:2px 8px;border-radius:4px;color:#fff;font-weight:600}
.v-true{background:#2e8b57}.v-false{background:#c0392b}.v-null{background:#d68910}
.legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:middle}
.scroll{overflow-x:auto;border:1px solid #ddd;margin:10px 0}
svg text{font-size:11px;fill:#333}
rect.op{stroke:#0003;stroke-width:.5}
rect.ok{fill:#7cc47f}rect.fail{fill:#f4a6c0}rect.info{fill:#f5a742}
rect.linearized{stroke:#1f4fd1;stroke-width:2}
rect.stuck{stroke:#d10000;stroke-width:3}
.stuck-marker{fill:#d10000;font-weight:700;font-size:15px}
.lin-order{fill:#1f4fd1;font-size:9px}
rect.nemesis{fill:#9aa4b8;opacity:.25}
text.nemesis-label{fill:#555;font-style:italic}
.dim{opacity:.12}
section.violation{border-left:4px solid #c0392b;padding:4px 10px;margin:10px 0;background:#fdf2f2}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
code{background:#f3f3f3;padding:0 3px}
"""

_JS: Final = """
(function(){
  // Wide timelines scroll: bring the first op that could not be linearized into view.
  var box=document.querySelector('.scroll'), stuck=document.querySelector('rect.stuck');
  var labels=document.querySelector('g.label-column');
  if(box&&labels){
    // Lane labels stay at the left edge while the timeline scrolls.
    box.addEventListener('scroll',function(){
      labels.setAttribute('transform','translate('+box.scrollLeft+',0)');
    });
  }
  if(box&&stuck){
    var x=parseFloat(stuck.getAttribute('x'))||0;
    box.scrollLeft=Math.max(0,x-box.clientWidth/2);
    if(labels)labels.setAttribute('transform','translate('+box.scrollLeft+',0)');
  }
  var sel=document.getElementById('key-filter');
  if(!sel)return;
  function apply(){
    var k=sel.value;
    document.querySelectorAll('.op,.stuck-marker,.lin-order').forEach(function(e){
      e.classList.toggle('dim', k!=='*' && e.getAttribute('data-key')!==k);
    });
  }
  sel.addEventListener('change',apply);
  document.querySelectorAll('[data-show-key]').forEach(function(b){
    b.addEventListener('click',function(){sel.value=b.getAttribute('data-show-key');apply();});
  });
})();
"""


def render_timeline(
    ops: Sequence[Op],
    results: CheckResult | None,
    title: str,
) -> str:
    """Return the timeline page for raw history events and (optionally) their check."""
    model: Model | None = None
    if results is not None:
        try:
            model = get_model(results.model)
        except ModelError:
            model = None
    bars = _bars(ops)
    times = [ev.time for ev in ops]
    t0 = min(times, default=0)
    t_end = max(times, default=1)
    span = max(t_end - t0, 1)
    width = max(MIN_W, min(MAX_W, len(bars) * 8))
    plot_w = width - LEFT - 20

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * plot_w

    processes = sorted(
        {b.invoke.process for b in bars},
        key=lambda p: (0, p, "") if isinstance(p, int) else (1, 0, str(p)),
    )
    lane_of = {p: i for i, p in enumerate(processes)}
    height = TOP + LANE_H * max(len(processes), 1) + 20

    lin_order: dict[int, int] = {}
    stuck_ids: set[int] = set()
    failures = results.failures if results is not None else []
    for kr in failures:
        for n, oid in enumerate(kr.prefix, 1):
            lin_order[oid] = n
        if kr.stuck is not None:
            stuck_ids.add(kr.stuck)

    svg: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    for iv in nemesis_intervals(ops):
        x1 = x(iv.start)
        x2 = x(iv.stop if iv.stop is not None else t_end)
        w = max(x2 - x1, 2.0)
        tip = html.escape(f"nemesis {iv.name}: {_fmt(iv.value)}")
        svg.append(
            f'<rect class="nemesis" data-f="{html.escape(iv.name)}" x="{x1:.1f}" y="{TOP - 4}" '
            f'width="{w:.1f}" height="{height - TOP}"><title>{tip}</title></rect>'
            f'<text class="nemesis-label" x="{x1 + 2:.1f}" y="{TOP - 8}">{html.escape(iv.name)}</text>'
        )
    by_lane: dict[Any, list[_Bar]] = {p: [] for p in processes}
    for b in bars:
        by_lane[b.invoke.process].append(b)
    labels: list[str] = []  # drawn last, in a group the page keeps at the left edge
    for p in processes:
        y = TOP + lane_of[p] * LANE_H
        svg.append(f'<g class="lane" data-process="{html.escape(str(p))}">')
        labels.append(f'<text x="6" y="{y + BAR_H - 2}">process {html.escape(str(p))}</text>')
        for b in by_lane[p]:
            inv, comp = b.invoke, b.complete
            end = comp.time if comp is not None and comp.type != "info" else t_end
            x1 = x(inv.time)
            w = max(x(end) - x1, 2.0)
            classes = ["op", b.outcome]
            extra = ""
            oid = inv.index
            if oid in lin_order:
                classes.append("linearized")
                extra += f' data-lin-order="{lin_order[oid]}"'
            if oid in stuck_ids:
                classes.append("stuck")
            key = html.escape(_key_str(inv.key))
            svg.append(
                f'<rect class="{" ".join(classes)}" data-op-id="{oid}" data-key="{key}" '
                f'data-outcome="{b.outcome}" data-process="{html.escape(str(p))}"{extra} '
                f'x="{x1:.1f}" y="{y}" width="{w:.1f}" height="{BAR_H}">'
                f"<title>{html.escape(_describe(b, model))}</title></rect>"
            )
            if oid in lin_order:
                svg.append(
                    f'<text class="lin-order" data-key="{key}" x="{x1 + 1:.1f}" y="{y + BAR_H + 8}">'
                    f"{lin_order[oid]}</text>"
                )
            if oid in stuck_ids:
                svg.append(
                    f'<text class="stuck-marker" data-key="{key}" data-op-id="{oid}" '
                    f'x="{x1 - 12:.1f}" y="{y + BAR_H - 1}">✗</text>'
                )
        svg.append("</g>")
    svg.append(
        f'<g class="label-column"><rect x="0" y="0" width="{LEFT - 6}" height="{height}" '
        f'fill="#fff" opacity=".85"/>{"".join(labels)}</g>'
    )
    svg.append("</svg>")

    return _page(title, ops, bars, results, model, "".join(svg))


def _page(
    title: str,
    ops: Sequence[Op],
    bars: list[_Bar],
    results: CheckResult | None,
    model: Model | None,
    svg: str,
) -> str:
    esc = html.escape
    by_index = {b.invoke.index: b for b in bars}
    verdict = (
        "unchecked"
        if results is None
        else {True: "linearizable", False: "NOT linearizable", None: "unknown"}[results.valid]
    )
    vclass = "v-null" if results is None else f"v-{json.dumps(results.valid)}"
    keys = sorted({_key_str(b.invoke.key) for b in bars})
    parts = [
        '<!DOCTYPE html><html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p><span class="verdict {vclass}">{esc(verdict)}</span> ',
    ]
    if results is not None:
        parts.append(
            f"model <code>{esc(results.model)}</code> · {results.ops} operations · "
            f"{len(results.keys)} keys · {len(results.failures)} invalid · "
            f"{len(results.unknowns)} unknown · {results.seconds:.3f} s"
        )
    parts.append("</p>")
    parts.append(
        '<p class="legend"><span><i class="sw" style="background:#7cc47f"></i>ok</span>'
        '<span><i class="sw" style="background:#f4a6c0"></i>fail</span>'
        '<span><i class="sw" style="background:#f5a742"></i>info (open to the end)</span>'
        '<span><i class="sw" style="background:#9aa4b8"></i>nemesis</span>'
        '<span><i class="sw" style="border:2px solid #1f4fd1"></i>linearized prefix (numbered)</span>'
        '<span style="color:#d10000">✗ could not be linearized</span></p>'
    )
    if len(keys) > 1:
        opts = "".join(f'<option value="{esc(k)}">{esc(k)}</option>' for k in keys)
        parts.append(
            f'<label>key <select id="key-filter"><option value="*">all</option>{opts}</select></label>'
        )
    parts.append(f'<div class="scroll">{svg}</div>')
    if results is not None:
        for kr in results.failures:
            k = _key_str(kr.key)
            parts.append(f'<section class="violation" data-key="{esc(k)}">')
            parts.append(
                f"<h2>key <code>{esc(k or '(single)')}</code> is not linearizable</h2>"
                f'<button data-show-key="{esc(k)}">show only this key</button>'
            )
            state = model.describe_state(kr.state) if model is not None else repr(kr.state)
            stuck = by_index.get(kr.stuck) if kr.stuck is not None else None
            stuck_desc = _describe(stuck, model) if stuck is not None else f"op {kr.stuck}"
            parts.append(
                f"<p>After the longest linearizable prefix ({len(kr.prefix)} ops) the state is "
                f'<code class="state">{esc(state)}</code>, and '
                f'<span class="stuck-op" data-op-id="{kr.stuck}">{esc(stuck_desc)}</span> '
                f"cannot be linearized.</p>"
            )
            parts.append("<table><tr><th>#</th><th>op</th></tr>")
            for n, oid in enumerate(kr.prefix, 1):
                b = by_index.get(oid)
                d = _describe(b, model) if b is not None else f"op {oid}"
                parts.append(
                    f'<tr class="prefix-op" data-op-id="{oid}"><td>{n}</td><td>{esc(d)}</td></tr>'
                )
            parts.append("</table></section>")
        for kr in results.unknowns:
            if kr.reason != "skipped":
                parts.append(
                    f'<p class="unknown" data-key="{esc(_key_str(kr.key))}">key '
                    f"<code>{esc(_key_str(kr.key) or '(single)')}</code>: unknown "
                    f"({esc(kr.reason or '')}, {kr.steps} steps)</p>"
                )
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write_timeline(
    path: str | os.PathLike[str],
    ops: Sequence[Op],
    results: CheckResult | None,
    title: str,
) -> None:
    """Write :func:`render_timeline` output to ``path`` (UTF-8)."""
    page = render_timeline(ops, results, title)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
