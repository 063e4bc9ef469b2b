"""Charts as inline SVG, drawn on the server: they need no JavaScript and no library.

Each chart is ``role="img"`` with a title and a description for screen readers, and is
followed by the same numbers as a table (in a ``<details>``), so nothing is only a
picture. Colours come from CSS classes (``s-<name>``), never inline styles: the console's
Content-Security-Policy allows no inline style.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agentd.console.html import Markup, join, render

WIDTH = 720
HEIGHT = 220
PAD_LEFT = 56
PAD_BOTTOM = 28
PAD_TOP = 10


@dataclass(frozen=True)
class Series:
    """One stacked layer: ``name`` (shown in the legend), its CSS class suffix, a value per
    bucket."""

    name: str
    css: str
    values: Sequence[float]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** (len(str(int(value))) - 1) if value >= 1 else 0.1
    while step * 10 < value:
        step *= 10
    for mult in (1, 2, 2.5, 5, 10):
        if step * mult >= value:
            return step * mult
    return value  # pragma: no cover


def stacked_bars(
    chart_id: str,
    title: str,
    description: str,
    labels: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    label_every: int = 1,
) -> Markup:
    """A stacked bar chart with a legend and a table of the same numbers."""
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0.0))
    plot_w = WIDTH - PAD_LEFT - 8
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    n = max(1, len(labels))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    shapes: list[Markup] = []
    for frac in (0.0, 0.5, 1.0):
        y = PAD_TOP + plot_h * (1 - frac)
        shapes.append(
            render(
                '<line class="grid" x1="{x1}" x2="{x2}" y1="{y:.1f}" y2="{y:.1f}"/>'
                '<text class="axis" x="{tx}" y="{ty:.1f}" text-anchor="end">{v}</text>',
                x1=PAD_LEFT,
                x2=WIDTH - 8,
                y=y,
                tx=PAD_LEFT - 6,
                ty=y + 4,
                v=fmt(top * frac),
            )
        )
    for i, label in enumerate(labels):
        x = PAD_LEFT + i * slot + (slot - bar_w) / 2
        base = float(PAD_TOP + plot_h)
        for s in series:
            v = s.values[i]
            if v <= 0:
                continue
            h = plot_h * v / top
            base -= h
            shapes.append(
                render(
                    '<rect class="s-{css}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                    'height="{h:.1f}"><title>{label}: {name} {v}</title></rect>',
                    css=s.css,
                    x=x,
                    y=base,
                    w=bar_w,
                    h=h,
                    label=label,
                    name=s.name,
                    v=fmt(v),
                )
            )
        if i % label_every == 0:
            shapes.append(
                render(
                    '<text class="axis" x="{x:.1f}" y="{y}" text-anchor="middle">{label}</text>',
                    x=x + bar_w / 2,
                    y=HEIGHT - 10,
                    label=label,
                )
            )
    legend = join(
        render('<li><span class="swatch s-{css}" aria-hidden="true"></span>{name}</li>', **vars_)
        for vars_ in ({"css": s.css, "name": s.name} for s in series if any(s.values))
    )
    head = join(render("<th scope='col'>{n}</th>", n=s.name) for s in series)
    rows = join(
        render(
            "<tr><th scope='row'>{label}</th>{cells}<td>{total}</td></tr>",
            label=label,
            cells=join(render("<td>{v}</td>", v=fmt(s.values[i])) for s in series),
            total=fmt(totals[i]),
        )
        for i, label in enumerate(labels)
        if totals[i] > 0
    ) or render("<tr><td colspan='{n}'>nothing in this period</td></tr>", n=len(series) + 2)
    return render(
        '<figure class="chart" id="{cid}">'
        '<svg viewBox="0 0 {w} {h}" role="img" aria-labelledby="{cid}-t {cid}-d">'
        '<title id="{cid}-t">{title}</title><desc id="{cid}-d">{desc}</desc>{shapes}</svg>'
        '<figcaption><ul class="legend">{legend}</ul></figcaption>'
        "<details><summary>{title}: the numbers</summary>"
        '<div class="scroll"><table><thead><tr><th scope="col">when</th>{head}'
        '<th scope="col">total</th></tr></thead><tbody>{rows}</tbody></table></div>'
        "</details></figure>",
        cid=chart_id,
        w=WIDTH,
        h=HEIGHT,
        title=title,
        desc=description,
        shapes=join(shapes),
        legend=legend,
        head=head,
        rows=rows,
    )


def meter(spent: float, limit: float | None, label: str) -> Markup:
    """Spend against a limit as a ``<meter>`` (no limit: the amount alone)."""
    if limit is None or limit <= 0:
        return render("<span>{s} USD (no limit)</span>", s=f"{spent:.4f}")
    return render(
        '<meter min="0" max="{lim}" low="{low}" high="{high}" optimum="0" value="{v}" '
        'aria-label="{label}">{pct}%</meter> <span>{s} of {lim} USD ({pct}%)</span>',
        lim=f"{limit:g}",
        low=f"{limit * 0.5:g}",
        high=f"{limit * 0.8:g}",
        v=f"{min(spent, limit):.6f}",
        label=label,
        pct=f"{100 * spent / limit:.0f}",
        s=f"{spent:.4f}",
    )
