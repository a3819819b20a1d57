"""Collect the ``surgery eval length --json`` reports of the miniature into one table and plot.

    python summarize.py build/results system1 system2 base task_arithmetic ties ...

reads ``build/results/NAME.json`` for each NAME and writes ``summary.json`` (a list of rows: method, accuracy,
mean_length, reflection_rate, per difficulty, and the change against System 2), ``summary.md``, ``summary.png``,
and ``best`` (the name of the shortest merge within 5% of System 2's accuracy; the most accurate merge if none is).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from surgery.evaluation.plots import accuracy_length_plot
from surgery.sweep import recommend

INPUTS = {"system1", "system2", "base"}
GOAL_SHORTER = 0.40  # the goal: at least 40% shorter than System 2 ...
GOAL_ACCURACY = 0.95  # ... at 95% of its accuracy or more


def rows_from(results: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        report = json.loads((results / f"{name}.json").read_text())
        rows.append({"method": name, "name": name, "kind": "input" if name in INPUTS else "merge",
                     **{key: report[key] for key in ("accuracy", "mean_length", "reflection_rate", "truncated_rate",
                                                     "count", "by_difficulty")}})
    system2 = next(row for row in rows if row["method"] == "system2")
    for row in rows:
        row["length_vs_system2"] = round(row["mean_length"] / system2["mean_length"] - 1, 4)
        row["accuracy_vs_system2"] = round(row["accuracy"] / system2["accuracy"], 4) if system2["accuracy"] else None
        row["meets_goal"] = (row["kind"] == "merge" and row["length_vs_system2"] <= -GOAL_SHORTER
                             and row["accuracy"] >= GOAL_ACCURACY * system2["accuracy"])
    return rows


def markdown(rows: list[dict]) -> str:
    levels = list(rows[0]["by_difficulty"])
    head = ["method", "accuracy", "mean length", "vs System 2", "reflective",
            *(f"acc d{level}" for level in levels), *(f"len d{level}" for level in levels), "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], f"{row['accuracy']:.3f}", f"{row['mean_length']:.1f}",
                 f"{100 * row['length_vs_system2']:+.1f}%", f"{row['reflection_rate']:.2f}",
                 *(f"{row['by_difficulty'][level]['accuracy']:.2f}" for level in levels),
                 *(f"{row['by_difficulty'][level]['mean_length']:.1f}" for level in levels),
                 "yes" if row["meets_goal"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    results, names = Path(sys.argv[1]), sys.argv[2:]
    rows = rows_from(results, names)
    merges = [row for row in rows if row["kind"] == "merge"]
    system2 = next(row for row in rows if row["method"] == "system2")
    best = merges[recommend(merges, system2["accuracy"], 1 - GOAL_ACCURACY)]
    (results / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    (results / "summary.md").write_text(table)
    (results / "best").write_text(best["method"] + "\n")
    accuracy_length_plot([{**row, "recommended": row is best} for row in rows], results / "summary.png",
                         title="System 1 + System 2 merges: accuracy against mean response length")
    print(table)
    met = [row["method"] for row in merges if row["meets_goal"]]
    print(f"goal (≥ {GOAL_SHORTER:.0%} shorter than System 2 at ≥ {GOAL_ACCURACY:.0%} of its accuracy): "
          + (f"met by {', '.join(met)}" if met else "not met") + f"; best merge: {best['method']}")


if __name__ == "__main__":
    main()
