"""A rendered Markdown page's tables as LaTeX tabulars."""

from __future__ import annotations


def to_latex(markdown: str) -> str:
    """The Markdown tables of a rendered page as LaTeX tabulars (headings and legends become comments)."""
    out, rows = [], []

    def flush():
        if rows:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
            out.append("\\begin{tabular}{l" + "r" * (len(cells[0]) - 1) + "}")
            out.append("\\hline")
            for i, row in enumerate(cells):
                out.append(" & ".join(_tex(c) for c in row) + " \\\\")
                if i == 0:
                    out.append("\\hline")
            out.extend(["\\hline", "\\end{tabular}", ""])
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append("% " + line.lstrip("# "))
        elif line.strip():  # legends and notes travel with the tabular, as comments for the caption
            out.append("% " + line)
    flush()
    return "\n".join(out).rstrip() + "\n"


def _tex(cell: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("->", "$\\to$"), ("*", "$^*$"), ("†", "$^\\dagger$")):
        cell = cell.replace(a, b)
    return cell
