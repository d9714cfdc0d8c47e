"""The benchmark AUROC over a product's versions as inline SVG: drawn on the server, no script."""

from __future__ import annotations

from flows.review.state import VersionRow

WIDTH, HEIGHT, PAD = 560, 180, 32


def auroc_svg(rows: list[VersionRow]) -> str:
    """Points at each version's AUROC (filled: labelled evidence, hollow: synthetic), bars for the
    interval, on a 0.5-1.0 scale; only numbers and fixed words enter the markup."""
    shown = [r for r in rows if r.auroc is not None]
    if not shown:
        return ""
    step = (WIDTH - 2 * PAD) / max(1, len(shown) - 1)

    def y(value: float) -> float:
        return HEIGHT - PAD - (min(1.0, max(0.5, value)) - 0.5) / 0.5 * (HEIGHT - 2 * PAD)

    parts = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="benchmark AUROC by version">']
    for level in (0.5, 0.75, 1.0):
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(level):.1f}" y2="{y(level):.1f}" class="grid"/>'
                     f'<text x="2" y="{y(level) + 4:.1f}">{level:.2f}</text>')
    for i, row in enumerate(shown):
        x = PAD + i * step
        if row.interval:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y(row.interval[0]):.1f}" '
                         f'y2="{y(row.interval[1]):.1f}" class="interval"/>')
        kind = "labelled" if row.evidence == "labelled" else "synthetic"
        parts.append(f'<circle cx="{x:.1f}" cy="{y(row.auroc or 0):.1f}" r="4" class="{kind}">'
                     f'<title>v{int(row.version)}: {row.auroc:.3f} ({kind})</title></circle>'
                     f'<text x="{x - 6:.1f}" y="{HEIGHT - 8}">v{int(row.version)}</text>')
    parts.append("</svg>")
    return "".join(parts)
