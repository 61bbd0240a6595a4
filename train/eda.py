"""Exploratory data analysis on labels alone, before any image is decoded (``--eda-only``): counts
per age group, gender and fold, subjects shared between folds, label.json, plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from ..runtime.datasets import DataReport, Record, age_group_name
from ..runtime.fsutil import write_json, write_text
from ..runtime.labels import AGE_GROUPS, GENDERS


def _gender_name(g: int | None) -> str:
    return "unknown" if g is None else GENDERS[g]


def records_frame(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [r.path for r in records],
        "age_group": [age_group_name(r.age) for r in records],
        "gender": [_gender_name(r.gender) for r in records],
        "subject": [r.subject for r in records],
        "fold": [r.fold for r in records],
    })


def summarize(records: list[Record], report: DataReport) -> dict:
    def counts(rs: list[Record]) -> dict:
        ages = Counter(r.age for r in rs)
        genders = Counter(r.gender for r in rs)
        return {
            "rows": len(rs),
            "users": len({r.subject for r in rs}),
            "age_groups": {g: ages.get(i, 0) for i, g in enumerate(AGE_GROUPS)},
            "no_age": ages.get(None, 0),
            "genders": {"male": genders.get(0, 0), "female": genders.get(1, 0), "unknown": genders.get(None, 0)},
        }

    summary = counts(records)
    summary["format"] = report.format
    summary["missing_images"] = report.missing_images
    summary["skipped"] = dict(report.skipped)
    folds = sorted({r.fold for r in records if r.fold is not None})
    summary["per_fold"] = {str(k): counts([r for r in records if r.fold == k]) for k in folds}
    subjects_per_fold = [{r.subject for r in records if r.fold == k} for k in folds]
    shared = set().union(*[a & b for i, a in enumerate(subjects_per_fold) for b in subjects_per_fold[i + 1:]]) \
        if len(folds) > 1 else set()
    summary["subjects_in_several_folds"] = len(shared)
    return summary


def _bar(table: pd.DataFrame, title: str, xlabel: str, path: Path, stacked: bool = False) -> None:
    from .plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    table.plot.bar(ax=ax, stacked=stacked)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    fig.tight_layout()
    save_figure(fig, path)


def _plot(df: pd.DataFrame, out: Path) -> None:
    order = list(AGE_GROUPS) + ["none"]
    _bar(pd.crosstab(df["age_group"], df["gender"]).reindex(order, fill_value=0), "Age group x gender",
         "age group", out / "age_gender_counts.png")
    if df["fold"].notna().any():
        _bar(pd.crosstab(df["fold"], df["age_group"]).reindex(columns=order, fill_value=0), "Age groups per fold",
             "fold", out / "per_fold_counts.png", stacked=True)


def run_eda(records: list[Record], report: DataReport, out_dir: str | Path) -> dict:
    """Write OUT/eda/{summary.json,label_counts.csv,label.json,*.png}; returns the summary."""
    out = Path(out_dir) / "eda"
    out.mkdir(parents=True, exist_ok=True)
    df = records_frame(records)
    summary = summarize(records, report)
    counts = df.groupby(["fold", "age_group", "gender"], dropna=False).size().rename("count").reset_index()
    write_text(out / "label_counts.csv", counts.to_csv(index=False))
    labels = {r.path: {"age_group": age_group_name(r.age), "gender": _gender_name(r.gender),
                       "subject": r.subject, "fold": r.fold} for r in records}
    write_text(out / "label.json", json.dumps(labels, indent=1) + "\n")
    _plot(df, out)
    write_json(out / "summary.json", summary)
    return summary
