"""Plots of a run: learning curves per fold and confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..runtime.fsutil import atomic_path  # noqa: E402
from ..runtime.labels import AGE_GROUPS, GENDERS  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Write a PNG atomically and close the figure."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_curves(run_dir: Path, folds: list[int | str]) -> None:
    """curves.png: training loss and validation accuracy per epoch, one line per fold (or "final")."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k in folds:
        name = "final" if k == "final" else f"fold{k}"
        p = run_dir / name / "metrics.csv"
        if not p.is_file():
            continue
        df = pd.read_csv(p)
        label = "final" if k == "final" else f"fold {k}"
        axes[0].plot(df["epoch"], df["train_loss"], label=label)
        for ax, col in ((axes[1], "val_age_exact"), (axes[2], "val_gender_acc")):
            if col in df:
                ax.plot(df["epoch"], df[col], label=label)
    for ax, title in zip(axes, ("train loss", "val age exact", "val gender acc")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, run_dir / "curves.png")


def plot_confusion(cm: list[list[int]], names: tuple[str, ...], title: str, path: Path) -> None:
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    save_figure(fig, path)


def plot_fold_confusions(run_dir: Path, result: dict) -> None:
    k = result["fold"]
    cms = result.get("confusion", {})
    if "age" in cms:
        plot_confusion(cms["age"], AGE_GROUPS, f"fold {k}: age", run_dir / f"fold{k}" / "confusion_age.png")
    if "gender" in cms:
        plot_confusion(cms["gender"], GENDERS, f"fold {k}: gender", run_dir / f"fold{k}" / "confusion_gender.png")
