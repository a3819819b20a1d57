"""Accuracy against mean response length, as a PNG: one panel for all tasks, then one per difficulty::

    accuracy_length_plot(rows, "pareto.png", title="ties sweep")

Each row is a dict with ``name``, ``accuracy``, ``mean_length`` and optionally ``kind`` ("input" rows are drawn as
squares), ``by_difficulty`` ({level: {accuracy, mean_length}}), ``pareto`` (joined by a line) and ``recommended``
(a star); inputs are labelled by directory name or Hub id. The file is written atomically and carries no timestamp,
so the same rows give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from surgery.cards import model_name
from surgery.io.writer import write_file_atomic

LABELLED_ROWS = 16  # name every point when there are at most this many
PANELS_PER_ROW = 3


def _panel(axes, rows: list[dict], title: str) -> None:
    labelled = len(rows) <= LABELLED_ROWS
    front = sorted((row for row in rows if row.get("pareto")), key=lambda row: row["mean_length"])
    if front:
        axes.plot([row["mean_length"] for row in front], [row["accuracy"] for row in front], "-", color="tab:green",
                  alpha=0.6, label="Pareto front")
    for row in rows:
        marker, colour = (("s", "tab:red") if row.get("kind") == "input" else
                          ("*", "tab:orange") if row.get("recommended") else ("o", "tab:blue"))
        axes.scatter(row["mean_length"], row["accuracy"], marker=marker, color=colour,
                     s=140 if row.get("recommended") else 40, zorder=3)
        if labelled or row.get("kind") == "input" or row.get("recommended"):
            axes.annotate(model_name(row["name"]), (row["mean_length"], row["accuracy"]), fontsize=7,
                          xytext=(4, 3), textcoords="offset points")
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("mean response length (tokens)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.03, 1.05)
    axes.grid(alpha=0.3)


def accuracy_length_plot(rows: list[dict], path: str | Path, title: str) -> None:
    """Write accuracy against mean response length as a PNG: one panel for all tasks, then one per difficulty.

    Args:
        rows: the points (see the module docstring for their keys).
        path: the PNG file, written atomically.
        title: the figure's title.

    Example:
        ``accuracy_length_plot(rows, "pareto.png", title="ties sweep")``
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    levels = list(dict.fromkeys(level for row in rows for level in row.get("by_difficulty") or {}))
    count = 1 + len(levels)
    columns = min(PANELS_PER_ROW, count)
    rows_of_panels = -(-count // columns)
    figure, panels = pyplot.subplots(rows_of_panels, columns, figsize=(5 * columns, 4.2 * rows_of_panels),
                                     squeeze=False)
    axes = [axes for row in panels for axes in row]
    _panel(axes[0], rows, "all tasks")
    for panel, level in zip(axes[1:], levels):
        per_level = [{**row, **row["by_difficulty"][level], "pareto": False} for row in rows
                     if level in (row.get("by_difficulty") or {})]
        _panel(panel, per_level, f"difficulty {level}")
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    try:
        write_file_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100,
                                                                 metadata={"Software": None}))
    finally:
        pyplot.close(figure)
