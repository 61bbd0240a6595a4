"""The label mapping rule (runtime/labels.py: a bare number n is the range (n, n), a tuple is sorted,
the group of largest overlap wins, then the nearest, ties to the older group) on every raw label of
the real Adience fold files."""

from __future__ import annotations

from collections import Counter

import pytest

from agegender.runtime.labels import AGE_GROUPS, age_in_group, age_to_group, gender_to_index

# Every distinct age string in the five official fold files, with the group the rule gives.
ADIENCE_RAW = {
    "(0, 2)": "0-2", "(4, 6)": "4-6", "(8, 12)": "8-12", "(15, 20)": "15-20", "(25, 32)": "25-32",
    "(38, 43)": "38-43", "(48, 53)": "48-53", "(60, 100)": "60-100",
    "(25, 23)": "25-32", "(27, 32)": "25-32", "(38, 42)": "38-43", "(38, 48)": "38-43", "(8, 23)": "15-20",
    "2": "0-2", "3": "4-6", "13": "8-12", "22": "15-20", "23": "25-32", "29": "25-32", "32": "25-32",
    "34": "25-32", "35": "38-43", "36": "38-43", "42": "38-43", "45": "38-43", "46": "48-53", "55": "48-53",
    "56": "48-53", "57": "60-100", "58": "60-100",
    "None": None, "": None,
}


@pytest.mark.parametrize("raw,group", sorted(ADIENCE_RAW.items()))
def test_every_adience_raw_label(raw, group):
    idx = age_to_group(raw)
    assert (None if idx is None else AGE_GROUPS[idx]) == group


@pytest.mark.parametrize("raw,group", [("35", "38-43"), ("55", "48-53"), ("57", "60-100"), ("3", "4-6"),
                                       ("(38, 48)", "38-43"), (7, "8-12"), (14, "15-20"), (0, "0-2"),
                                       (100, "60-100"), (116, "60-100"), ("25-32", "25-32"), (33, "25-32"),
                                       (24, "25-32"), (21, "15-20"), (44, "38-43"), (47, "48-53")])
def test_design_examples_and_utkface_ages(raw, group):
    assert AGE_GROUPS[age_to_group(raw)] == group


@pytest.mark.parametrize("raw", [None, "None", "", "age", "abc", "(1, 2, 3)", -5, float("nan"), True])
def test_unusable_age_labels_are_none(raw):
    assert age_to_group(raw) is None


def test_tuple_order_does_not_matter():
    assert age_to_group("(32, 25)") == age_to_group("(25, 32)") == AGE_GROUPS.index("25-32")


def test_age_in_group():
    assert age_in_group(25) and age_in_group(0) and age_in_group(100)
    assert not age_in_group(3) and not age_in_group(35) and not age_in_group(101)


@pytest.mark.parametrize("raw,idx", [("m", 0), ("f", 1), ("Male", 0), ("female", 1), (0, 0), (1, 1), ("1.0", 1),
                                     ("u", None), ("", None), (None, None), ("x", None)])
def test_gender_mapping(raw, idx):
    assert gender_to_index(raw) == idx


def test_real_fold_files_hold_only_known_labels(adience_meta):
    raws = Counter()
    for k in range(5):
        lines = (adience_meta / f"fold_{k}_data.txt").read_text().splitlines()[1:]
        raws.update(line.split("\t")[3].strip() for line in lines if line.strip())
    unknown = set(raws) - set(ADIENCE_RAW)
    assert not unknown, f"raw labels not covered by the test table: {unknown}"
