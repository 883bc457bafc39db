"""Dependency-free SVG line plots for the experiment scripts (no matplotlib on the training machines)."""
from __future__ import annotations

import math

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def svg_plot(curves: dict, path: str, title: str, xlabel: str = "iteration", ylabel: str = "validation lm loss",
             logx: bool = False, markers: bool = False) -> None:
    """One polyline per entry of ``curves`` ({name: [(x, y), ...]}), a legend on the right; ``markers`` also
    draws each point (a scatter plot: one single-point entry per model)."""
    W, H, L, R, T, B = 720, 420, 60, 230, 30, 40
    fx = (lambda x: math.log10(x)) if logx else (lambda x: x)  # noqa: E731
    pts = [(fx(x), y) for c in curves.values() for x, y in c if not logx or x > 0]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: L + (fx(x) - x0) / ((x1 - x0) or 1.0) * (W - L - R)  # noqa: E731
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(L + W - R) / 2}" y="18" text-anchor="middle">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{L - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        xv = x0 + (x1 - x0) * i / 4
        x = 10 ** xv if logx else xv
        px = L + (xv - x0) / ((x1 - x0) or 1.0) * (W - L - R)
        out.append(f'<text x="{px:.1f}" y="{H - B + 16}" text-anchor="middle">{_short(x)}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(T + H - B) / 2}" transform="rotate(-90 14 {(T + H - B) / 2})" '
               f'text-anchor="middle">{ylabel}</text>')
    for k, (name, c) in enumerate(curves.items()):
        col = COLORS[k % len(COLORS)]
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c if not logx or x > 0)
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{poly}"/>')
        if markers:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{col}"/>' for x, y in c if not logx or x > 0]
        out.append(f'<line x1="{W - R + 10}" y1="{T + 20 * k + 10}" x2="{W - R + 30}" y2="{T + 20 * k + 10}" '
                   f'stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{W - R + 35}" y="{T + 20 * k + 14}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def _short(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"
