"""Inline SVG charts: line charts against relative depth and heatmaps, with axes, ticks and legends.

Written by hand so that the site needs no script library and works from file://. Every string that
reaches the markup passes through ``escape`` (labels can come from result files).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape

# Hues that stay apart for colour-blind readers, plus dash patterns, so lines differ in grey print too.
PALETTE = {
    "id": ("#5a6b7b", ""),
    "mat": ("#d55e00", ""),
    "affine": ("#009e73", "5 4"),
    "tuned": ("#0072b2", "2 3"),
    # layer interventions
    "skip": ("#000000", ""),
    "middle_repeat": ("#d55e00", "5 4"),
    "reverse": ("#cc79a7", "8 3 2 3"),
    "random": ("#e69f00", "4 2"),
    "parallel": ("#009e73", ""),
    "looped_parallel": ("#0072b2", "2 3"),
}
# mat and affine often coincide: the dashed affine line is drawn thinner, over a wider mat line
WIDTH = {"mat": 3.2, "affine": 1.8}
_EXTRA = [("#cc79a7", "8 3 2 3"), ("#e69f00", "4 2"), ("#56b4e9", "1 2"), ("#000000", "10 4")]
_ids = itertools.count()


def style_for(projector: str, variant: bool = False, index: int = 0) -> tuple[str, str]:
    """(colour, dash pattern) of a projector; unknown projectors take the extra hues in turn.

    A variant (a transfer fit) keeps its projector's hue but is dotted, so the pair reads as one family.
    """
    colour, dash = PALETTE.get(projector) or _EXTRA[index % len(_EXTRA)]
    return (colour, "2 3") if variant else (colour, dash)


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v - round(v, 1)) < 1e-9 else f"{v:.4g}"


def _num(v: float) -> str:
    return f"{v:.2f}"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] with steps of 1, 2 or 5 times a power of ten."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-6:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi - 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten (and 2x, 5x when the range is short) covering [lo, hi]."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    multiples = (1, 2, 5) if b - a <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(a, b + 1) for m in multiples]
    inside = [t for t in ticks if lo / 1.0001 <= t <= hi * 1.0001]
    return inside if len(inside) >= 2 else [10.0 ** a, 10.0 ** b]


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return _fmt(v)


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    tips: list[str] = field(default_factory=list)  # one hover text per point
    projector: str = ""  # picks the colour; defaults to the label
    variant: bool = False  # drawn dotted in the projector's colour (a transfer fit)
    index: int = 0

    @property
    def style(self) -> tuple[str, str]:
        return style_for(self.projector or self.label, self.variant, self.index)

    @property
    def width(self) -> float:
        return 2.0 if self.variant else WIDTH.get(self.projector or self.label, 2.0)


@dataclass
class MarkRow:
    """A strip under the plot: a star at every x where a test was significant."""

    label: str
    xs: list[float]
    tips: list[str] = field(default_factory=list)
    note: str | None = None  # shown instead of stars when the test could not be run


def line_chart(
    series: list[Series],
    *,
    title: str,
    y_label: str,
    x_label: str = "relative depth (layer / number of layers)",
    y_log: bool = False,
    y_range: tuple[float | None, float | None] = (None, None),
    marks: list[MarkRow] | None = None,
    width: int = 600,
    height: int = 300,
) -> Markup:
    """One polyline per series (and nothing else drawn as a polyline, so lines can be counted)."""
    marks = marks or []
    legend = legend_labels([s.label.partition(" (")[0] for s in series])
    # the right margin holds the legend and the strip labels: wide enough for the longest legend label
    left, top = 58, 14
    right = max(126, 40 + math.ceil(LEGEND_CHAR_PX * max((len(t) for t in legend), default=0)))
    strip = 20 * len(marks) + (8 if marks else 0)  # significance rows below the x axis
    pw, ph = width - left - right, height - top - 44
    total_h = height + strip

    ys = [y for s in series for y in s.ys if y is not None and math.isfinite(y) and (y > 0 or not y_log)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    lo = y_range[0] if y_range[0] is not None else lo
    hi = y_range[1] if y_range[1] is not None else hi
    if y_log:
        # whole decades at both ends, so the extreme values sit under a labelled tick
        lo = 10.0 ** math.floor(math.log10(max(lo, 1e-6)))
        hi = 10.0 ** math.ceil(math.log10(max(hi, lo * 10)))
        ticks = log_ticks(lo, hi)
        to_unit = lambda v: (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    else:
        ticks = nice_ticks(lo, hi)
        lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
        to_unit = lambda v: (v - lo) / (hi - lo if hi > lo else 1.0)

    def X(x: float) -> float:
        return left + x * pw

    def Y(y: float) -> float:
        return top + ph - min(1.0, max(0.0, to_unit(y))) * ph

    uid = f"c{next(_ids)}"
    out = [f'<svg class="chart" viewBox="0 0 {width} {total_h}" role="img" aria-labelledby="{uid}-t" '
           f'xmlns="http://www.w3.org/2000/svg">', f'<title id="{uid}-t">{escape(title)}</title>']
    out.append(f'<rect class="plot-bg" x="{left}" y="{top}" width="{pw}" height="{ph}"/>')
    for t in ticks:
        y = Y(t)
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{_num(y)}" y2="{_num(y)}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{_num(y + 3.5)}" text-anchor="end">{escape(_tick_label(t))}</text>')
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = X(t)
        out.append(f'<line class="grid grid-x" x1="{_num(x)}" x2="{_num(x)}" y1="{top}" y2="{top + ph}"/>')
        out.append(f'<text class="tick" x="{_num(x)}" y="{top + ph + 15}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class="axis-label" x="{left + pw / 2}" y="{top + ph + 34}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text class="axis-label" transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')

    for s in series:
        colour, dash = s.style
        # a point without a value is left out; its neighbours keep their own tips (tips go with xs, not with drawn points)
        pts = [(X(x), Y(y), s.tips[k] if k < len(s.tips) else "")
               for k, (x, y) in enumerate(zip(s.xs, s.ys)) if y is not None and math.isfinite(y)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<g class="series" data-series="{escape(s.label)}">')
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{s.width}"{dash_attr} '
                   f'points="{" ".join(f"{_num(a)},{_num(b)}" for a, b, _ in pts)}"/>')
        for a, b, tip in pts:
            out.append(f'<circle cx="{_num(a)}" cy="{_num(b)}" r="2.2" fill="{colour}" fill-opacity="0.9"><title>{escape(tip)}</title></circle>')
        out.append("</g>")

    # legend to the right of the plot; a parenthesised part (a transfer fit) goes on a second line
    lx, y = left + pw + 10, top + 8
    for s, shown in zip(series, legend):
        colour, dash = s.style
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2.5"{dash_attr}/>')
        rest = s.label.partition(" (")[2]
        out.append(f'<text class="legend" x="{lx + 30}" y="{y + 4}">{escape(shown)}<title>{escape(s.label)}</title></text>')
        if rest:
            y += 14
            out.append(f'<text class="legend-sub" x="{lx + 30}" y="{y + 4}">{escape(_short("(" + rest, 17))}</text>')
        y += 20

    # significance strip under the x axis label: one row per tested pair, its name on the right
    for k, row in enumerate(marks):
        y = top + ph + 56 + 20 * k
        out.append(f'<text class="mark-label" x="{left + pw + 8}" y="{y + 4}">{escape(_short(row.label, 18))}<title>{escape(row.label)}</title></text>')
        if row.note or not row.xs:
            out.append(f'<text class="mark-none" x="{left + 4}" y="{y + 4}">{escape(row.note or "no significant layer")}</text>')
            continue
        out.append(f'<line class="strip" x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}"/>')
        for j, x in enumerate(row.xs):
            tip = row.tips[j] if j < len(row.tips) else ""
            out.append(f'<text class="star" x="{_num(X(x))}" y="{y + 4.5}" text-anchor="middle">★<title>{escape(tip)}</title></text>')
    out.append("</svg>")
    return Markup("\n".join(out))


LEGEND_CHAR_PX = 8.0  # width of a legend character at its 12.5 px font (DejaVu Sans: about 7.5), generously
LEGEND_MAX_CHARS = 22  # beyond this a label is shortened (its full text stays in the tooltip)


def legend_labels(heads: list[str]) -> list[str]:
    """The legend's text for each series: whole up to LEGEND_MAX_CHARS characters; longer ones lose their middle,
    which keeps apart names that share a long prefix (``model`` and ``model:random:0``)."""
    out = []
    for h in heads:
        if len(h) <= LEGEND_MAX_CHARS:
            out.append(h)
        else:
            keep = LEGEND_MAX_CHARS - 1
            out.append(h[: keep - keep // 2] + "…" + h[len(h) - keep // 2:])
    return out


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Heatmaps

# A sequential scale (light to dark) for r^2 in [0, 1]; values below 0 get their own colour,
# because r^2 can be hugely negative and would otherwise flatten the scale.
_STOPS = [(0.0, (247, 251, 255)), (0.25, (198, 219, 239)), (0.5, (107, 174, 214)), (0.75, (33, 113, 181)), (1.0, (8, 48, 107))]
BELOW = "#f4a582"


def colour(v: float, vmin: float = 0.0, vmax: float = 1.0) -> str:
    if v < vmin:
        return BELOW
    t = min(1.0, (v - vmin) / (vmax - vmin))
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(c0, c1))
            return f"#{r:02x}{g:02x}{b:02x}"
    return "#08306b"


def heatmap(
    values: list[list[float | None]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str,
    x_label: str,
    y_label: str = "",
    cell: float = 18,
    label_width: int = 150,
) -> Markup:
    """Rows by columns of coloured cells (None: no value), a colour bar, and a hover text per cell."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    # few columns get larger cells; many get smaller ones, down to 8 units
    cell = max(8.0, min(max(cell, 28.0 if n_cols <= 12 else cell), 560 / max(1, n_cols)))
    top, left = 10, label_width
    gw, gh = n_cols * cell, n_rows * cell
    width = max(left + gw + 90, left + 7 * len(x_label))  # room for the axis label under a narrow grid
    height = top + gh + 48
    uid = f"h{next(_ids)}"
    out = [f'<svg class="heatmap" viewBox="0 0 {_num(width)} {_num(height)}" role="img" aria-labelledby="{uid}-t" '
           f'xmlns="http://www.w3.org/2000/svg" style="max-width:{_num(width * 1.25)}px">',
           f'<title id="{uid}-t">{escape(title)}</title>']
    for i, label in enumerate(row_labels):
        out.append(f'<text class="tick" x="{left - 6}" y="{_num(top + (i + 0.5) * cell + 3.5)}" text-anchor="end">{escape(label)}</text>')
        for j in range(n_cols):
            v = values[i][j]
            if v is None:
                continue
            x, y = left + j * cell, top + i * cell
            out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(cell)}" height="{_num(cell)}" fill="{colour(v)}" '
                       f'class="cell"><title>{escape(f"{label}, {col_labels[j]}: r² = {v:.4g}")}</title></rect>')
    every = max(1, math.ceil(n_cols / 15))  # label every k-th column so numbers never overlap
    for j, label in enumerate(col_labels):
        if j % every == 0 or (j == n_cols - 1 and j % every >= every / 2 + 1):
            out.append(f'<text class="tick" x="{_num(left + (j + 0.5) * cell)}" y="{_num(top + gh + 13)}" '
                       f'text-anchor="middle">{escape(label)}</text>')
    out.append(f'<text class="axis-label" x="{left}" y="{_num(top + gh + 32)}">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text class="axis-label" transform="translate(12 {_num(top + gh / 2)}) rotate(-90)" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    # colour bar: 0 .. 1 and a swatch for negative values
    bx, bh = left + gw + 18, max(60.0, gh - 22)
    out.append(f'<defs><linearGradient id="{uid}-g" x1="0" x2="0" y1="1" y2="0">'
               + "".join(f'<stop offset="{t}" stop-color="{colour(t)}"/>' for t, _ in _STOPS)
               + "</linearGradient></defs>")
    out.append(f'<rect x="{_num(bx)}" y="{top}" width="12" height="{_num(bh)}" fill="url(#{uid}-g)" class="bar"/>')
    for t in (0, 0.5, 1):
        y = top + bh - t * bh
        out.append(f'<text class="tick" x="{_num(bx + 16)}" y="{_num(y + 3.5)}">{_fmt(t)}</text>')
    out.append(f'<rect x="{_num(bx)}" y="{_num(top + bh + 8)}" width="12" height="12" fill="{BELOW}"/>')
    out.append(f'<text class="tick" x="{_num(bx + 16)}" y="{_num(top + bh + 18)}">&lt; 0</text>')
    out.append("</svg>")
    return Markup("\n".join(out))
