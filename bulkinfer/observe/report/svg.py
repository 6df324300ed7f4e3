"""A chart drawn as inline SVG, for reports made without matplotlib: plain axes, the data, the
reference lines and a legend; enough to read the numbers, nothing fancy."""

from __future__ import annotations

import math
from html import escape

from bulkinfer.observe.report.charts import SERIES_COLOURS, Chart

WIDTH, HEIGHT = 880, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 46


def draw_svg(chart: Chart) -> str:
    rows = len(chart.labels)
    height = HEIGHT if chart.kind != "hbars" else min(80 + 22 * rows, 1600)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM
    xs = [x for s in chart.series for x in s.x]
    ys = [y for s in chart.series for y in s.y] + [v for _, v in chart.references]
    if chart.kind == "bars":
        xs = xs + [x + w for x, w in zip(chart.series[0].x, chart.widths, strict=True)]
    x_low, x_high = (0.0, 1.0) if chart.kind == "hbars" else (min(xs), max(xs))
    if chart.x_range is not None:
        x_low, x_high = chart.x_range
    y_high = 1.0 if chart.kind == "hbars" else max(max(ys, default=0) * 1.1, 1e-9)

    def sx(x: float) -> float:
        if chart.log_x:
            x, lo, hi = math.log(max(x, 1e-9)), math.log(max(x_low, 1e-9)), math.log(x_high)
        else:
            lo, hi = x_low, x_high
        return LEFT + (x - lo) / ((hi - lo) or 1) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - y / y_high * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="{LEFT}" y="20" font-size="14">{escape(chart.title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#bbbbbb"/>',
    ]
    if chart.kind == "hbars":
        parts += _hbars(chart, plot_w, plot_h)
    else:
        parts += _data(chart, sx, sy)
        for fraction in (0, 0.5, 1):
            value = y_high / 1.1 * fraction if fraction else 0
            label = f"{value:.0%}" if chart.percent_y else _number(value)
            parts.append(
                f'<text x="{LEFT - 6}" y="{sy(value) + 4:.1f}" text-anchor="end">{label}</text>'
            )
        for x in (x_low, x_high):
            parts.append(
                f'<text x="{sx(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
                f"{_number(x)}</text>"
            )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{height - 8}" text-anchor="middle">'
        f"{escape(chart.x_label)}</text>"
    )
    parts += _legend(chart)
    parts.append("</svg>")
    return "\n".join(parts)


def _data(chart: Chart, sx, sy) -> list[str]:
    parts = []
    first = chart.series[0]
    if chart.kind == "bars":
        for x, w, y in zip(first.x, chart.widths, first.y, strict=True):
            parts.append(
                f'<rect x="{sx(x):.1f}" y="{sy(y):.1f}" width="{max(sx(x + w) - sx(x) - 1, 1):.1f}" '
                f'height="{sy(0) - sy(y):.1f}" fill="{SERIES_COLOURS[0]}"/>'
            )
    elif chart.kind == "lines":
        for series, colour in zip(chart.series, SERIES_COLOURS, strict=False):
            points = " ".join(
                f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(series.x, series.y, strict=True)
            )
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
    elif chart.kind == "points":
        for x, y in zip(first.x, first.y, strict=True):
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{SERIES_COLOURS[0]}"/>'
            )
        for (_, value), colour in zip(chart.references, SERIES_COLOURS[1:], strict=False):
            parts.append(
                f'<line x1="{sx(min(first.x)):.1f}" x2="{sx(max(first.x)):.1f}" y1="{sy(value):.1f}" '
                f'y2="{sy(value):.1f}" stroke="{colour}" stroke-dasharray="6 4" stroke-width="2"/>'
            )
    return parts


def _hbars(chart: Chart, plot_w: float, plot_h: float) -> list[str]:
    parts = []
    step = plot_h / max(len(chart.labels), 1)
    for i, (label, done, colour) in enumerate(
        zip(chart.labels, chart.series[0].y, chart.colours, strict=True)
    ):
        y = TOP + i * step + step * 0.15
        parts.append(
            f'<rect x="{LEFT}" y="{y:.1f}" width="{plot_w}" height="{step * 0.7:.1f}" fill="#eeeeee"/>'
            f'<rect x="{LEFT}" y="{y:.1f}" width="{plot_w * done:.1f}" height="{step * 0.7:.1f}" '
            f'fill="{colour}"/>'
            f'<text x="{LEFT - 6}" y="{y + step * 0.5:.1f}" text-anchor="end">{escape(label)}</text>'
        )
    return parts


def _legend(chart: Chart) -> list[str]:
    entries = []
    if chart.kind == "lines" and len(chart.series) > 1:
        entries = [(s.label, c) for s, c in zip(chart.series, SERIES_COLOURS, strict=False)]
    if chart.kind == "points":
        entries = [("one batch", SERIES_COLOURS[0])] + [
            (f"{label}: {value:.1%}", c)
            for (label, value), c in zip(chart.references, SERIES_COLOURS[1:], strict=False)
        ]
    entries += [(note, "#888888") for note in chart.notes]
    parts = []
    for i, (label, colour) in enumerate(entries):
        y = TOP + 16 + 16 * i
        parts.append(
            f'<rect x="{WIDTH - RIGHT - 300}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{WIDTH - RIGHT - 285}" y="{y}">{escape(label)}</text>'
        )
    return parts


def _number(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.2g}"
