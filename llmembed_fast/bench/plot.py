"""Optional bar chart of the bench speedups (matplotlib)."""

from __future__ import annotations

import os


def plot_path(path: str) -> str:
    """The file the chart goes to (matplotlib adds .png to a name without a known suffix); a path ending
    in a separator as given (a folder: refused by the check, not written as its hidden ".png")."""
    known = (".png", ".svg", ".pdf", ".jpg", ".jpeg", "/", os.sep)
    return path if path.lower().endswith(known) else path + ".png"


def plot_records(records: list[dict], path: str) -> str:
    path = plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    labels, values = [], []
    for rec in records:
        for bname, b in rec.get("baselines", {}).items():
            if "speedup" in b:
                labels.append(f"{rec['case']}\nvs {bname}")
                values.append(b["speedup"])
    if not values:
        return "plot skipped: no timed comparisons"
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.set_xlabel("speedup (baseline time / llmembed_fast time)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
