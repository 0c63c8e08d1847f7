"""The progress plot of the topology terms (``progress_topology.png``, next to nnU-Net's ``progress.png``)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

__all__ = ["plot_term_progress"]


def plot_term_progress(curves: Mapping[str, Tuple[Sequence[float], Sequence[float]]], path: str,
                       switch_epoch: Optional[int] = None) -> None:
    """One panel per term: training and validation value per epoch (the shorter list sets the length); a dashed
    vertical line at ``switch_epoch``, where the topology terms were switched on (two-phase schedule)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 1, figsize=(10, 4 * len(curves)), squeeze=False)
    for ax, (name, (tr, va)) in zip(axes[:, 0], curves.items()):
        n = min(len(tr), len(va))
        ax.plot(range(n), tr[:n], color="b", label=f"train_{name}")
        ax.plot(range(n), va[:n], color="r", label=f"val_{name}")
        if switch_epoch is not None:
            ax.axvline(switch_epoch, color="k", linestyle="--", label="topology terms on")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
