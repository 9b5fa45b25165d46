"""Charts as SVG drawn on the server: no script, no library, nothing fetched.

Pure functions from numbers to markup. Each chart is an `<svg role="img">` with a
`<title>` and a `<desc>` that say what it shows, and a `<title>` on every bar (its
tooltip); the page puts the numbers beside each chart as a table. Colours come from
classes (static/calls/admin.css), so they follow the admin's light and dark themes,
and nothing is inline style: the page runs under a CSP without 'unsafe-inline'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

# Pixels around the plot: room for the value axis on the left and the labels below.
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22
# Gridlines on the value axis, about.
TICKS = 4


@dataclass(frozen=True, slots=True)
class Column:
    """One stacked column: `answered` at the bottom, the rest of `total` on top."""

    label: str
    total: int
    answered: int
    tooltip: str


@dataclass(frozen=True, slots=True)
class Row:
    """One horizontal bar: its label, its value and the class that colours it."""

    label: str
    value: int
    kind: str


def nice_step(largest: int, ticks: int = TICKS) -> int:
    """A gridline step of 1, 2 or 5 times a power of ten giving about `ticks` lines up to `largest`."""
    rough = max(largest, 1) / ticks
    magnitude = 1
    while magnitude * 10 <= rough:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= rough:
            return factor * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def _open(slug: str, title: str, desc: str, width: int, height: int) -> list[str]:
    return [
        f'<svg class="chart" id="{escape(slug)}" role="img" aria-labelledby="{escape(slug)}-title {escape(slug)}-desc" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(slug)}-title">{escape(title)}</title>',
        f'<desc id="{escape(slug)}-desc">{escape(desc)}</desc>',
    ]


def column_chart(
    slug: str,
    title: str,
    desc: str,
    columns: Sequence[Column],
    *,
    width: int = 560,
    height: int = 200,
    label_every: int = 1,
) -> SafeString:
    """Stacked columns (answered, then not answered) on a value axis with gridlines."""
    plot_width, plot_height = width - LEFT - RIGHT, height - TOP - BOTTOM
    step = nice_step(max((column.total for column in columns), default=0))
    top = step * max(1, -(-max((column.total for column in columns), default=0) // step))
    parts = _open(slug, title, desc, width, height)
    for value in range(0, top + 1, step):
        y = TOP + plot_height - plot_height * value / top
        parts.append(f'<line class="chart-grid" x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="chart-axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,}</text>')
    slot = plot_width / max(len(columns), 1)
    bar = max(slot * 0.8, 1.0)
    for index, column in enumerate(columns):
        x = LEFT + index * slot + (slot - bar) / 2
        answered_height = plot_height * column.answered / top
        other_height = plot_height * (column.total - column.answered) / top
        base = TOP + plot_height
        parts.append(f'<g class="chart-column" data-label="{escape(column.label)}" data-total="{column.total}">')
        parts.append(f"<title>{escape(column.tooltip)}</title>")
        if column.answered:
            parts.append(
                f'<rect class="chart-answered" x="{x:.1f}" y="{base - answered_height:.1f}" '
                f'width="{bar:.1f}" height="{answered_height:.1f}"/>'
            )
        if column.total - column.answered:
            parts.append(
                f'<rect class="chart-unanswered" x="{x:.1f}" y="{base - answered_height - other_height:.1f}" '
                f'width="{bar:.1f}" height="{other_height:.1f}"/>'
            )
        parts.append("</g>")
        if index % label_every == 0 or index == len(columns) - 1:
            parts.append(
                f'<text class="chart-axis" x="{x + bar / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                f"{escape(column.label)}</text>"
            )
    parts.append(
        f'<line class="chart-baseline" x1="{LEFT}" x2="{width - RIGHT}" y1="{TOP + plot_height}" '
        f'y2="{TOP + plot_height}"/>'
    )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every value above is a number or escaped


def bar_chart(slug: str, title: str, desc: str, rows: Sequence[Row], *, width: int = 560) -> SafeString:
    """Horizontal bars, one per row, labelled on the left with their value at the end."""
    label_width, value_width, bar_height, gap = 200, 56, 18, 6
    height = TOP + len(rows) * (bar_height + gap) + 4
    plot = width - label_width - value_width
    largest = max((row.value for row in rows), default=0) or 1
    parts = _open(slug, title, desc, width, height)
    for index, row in enumerate(rows):
        y = TOP + index * (bar_height + gap)
        length = plot * row.value / largest
        parts.append(f'<g class="chart-row" data-label="{escape(row.label)}" data-value="{row.value}">')
        parts.append(f"<title>{escape(row.label)}: {row.value:,}</title>")
        parts.append(
            f'<text class="chart-label" x="{label_width - 8}" y="{y + bar_height - 5}" text-anchor="end">'
            f"{escape(row.label)}</text>"
        )
        parts.append(
            f'<rect class="chart-{escape(row.kind)}" x="{label_width}" y="{y}" width="{max(length, 1):.1f}" '
            f'height="{bar_height}"/>'
        )
        parts.append(
            f'<text class="chart-value" x="{label_width + length + 6:.1f}" y="{y + bar_height - 5}">'
            f"{row.value:,}</text>"
        )
        parts.append("</g>")
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every value above is a number or escaped
