"""Shared pieces of every benchmark: the machine line and the result files.

Each bench writes ``results/<name>.json`` (a flat dict of headline figures, with the machine
and date), ``results/<name>.md`` (title, machine, table, notes) and its PNG plots.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import numpy
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
            f"Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def write_results(name: str, flat: dict, title: str, table: str, notes: list[str],
                  quick: bool) -> None:
    """Write ``results/<name>.json`` (flat headline dict) and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    flat = {"machine": machine(), "date": datetime.date.today().isoformat(), "quick": quick,
            **flat}
    (RESULTS / f"{name}.json").write_text(json.dumps(flat, indent=1) + "\n")
    lines = [f"# {title}", "",
             f"{flat['date']}, {flat['machine']}{', --quick' if quick else ''}.", "",
             table, ""]
    lines += [f"- {note}" for note in notes]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / name}.{{json,md,png}}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log_bar_groups(name: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
                   title: str, figsize: tuple[float, float],
                   reference: tuple[float, str] | None = None) -> None:
    """``results/<name>.png``: one group of bars per label (one bar per series), log scale;
    ``reference``: (y, label) of a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=figsize)
    for index, (label, values) in enumerate(series.items()):
        ax.bar(x + (index - (len(series) - 1) / 2) * width, values, width=width, label=label)
    ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference[0], color="k", lw=0.8, ls="--", label=reference[1])
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
