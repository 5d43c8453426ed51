"""Draw the latency/importance frontier with the chosen plan marked (matplotlib imported lazily); beside it,
where given, the frontier of merging alone, so that a reader sees what pruning buys."""

from __future__ import annotations

from typing import Optional, Sequence

from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, atomic_path
from dpcompress.graph.plan import Plan


def plot_frontier(path: PathLike, frontier: Sequence[Plan], chosen: Optional[Plan] = None,
                  budget_ms: Optional[float] = None, original_latency_ms: Optional[float] = None,
                  title: str = "latency / importance frontier", merge_only: Optional[Sequence[Plan]] = None) -> None:
    """Write a PNG (or any format matplotlib knows from the suffix) of the frontier, and of ``merge_only``
    (the frontier of the same tables without pruning options) where given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib: pip install 'dpcompress[plot]'") from err
    latency = [p.latency_ms for p in frontier]
    importance = [p.importance for p in frontier]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        if merge_only:
            ax.step([p.latency_ms for p in merge_only], [p.importance for p in merge_only], where="post",
                    color="tab:orange", linewidth=1, alpha=0.6)
            ax.scatter([p.latency_ms for p in merge_only], [p.importance for p in merge_only], s=10, marker="x",
                       color="tab:orange", label=f"merging alone ({len(merge_only)} plans)")
        ax.step(latency, importance, where="post", color="tab:blue", linewidth=1, alpha=0.6)
        ax.scatter(latency, importance, s=10, color="tab:blue",
                   label=(f"merging and pruning ({len(frontier)} plans)" if merge_only is not None
                          else f"Pareto-optimal plans ({len(frontier)})"))
        if chosen is not None:
            ax.scatter([chosen.latency_ms], [chosen.importance], s=80, marker="*", color="tab:red", zorder=3,
                       label=f"chosen: {chosen.latency_ms:.4g} ms, {len(chosen.activations)} activations")
        if budget_ms is not None:
            ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget_ms:.4g} ms")
        if original_latency_ms is not None:
            ax.axvline(original_latency_ms, color="gray", linestyle=":", linewidth=1,
                       label=f"original {original_latency_ms:.4g} ms")
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("importance (sum over segments)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=_format_of(path))
    finally:
        plt.close(fig)


def _format_of(path: PathLike) -> str:
    suffix = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else "png"
    return suffix or "png"
