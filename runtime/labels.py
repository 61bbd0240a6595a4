"""The label vocabulary: one source of truth for training, export and the runtime.

Age groups are Adience's eight. Raw age labels (Adience strings such as ``"(25, 32)"``,
``"(25, 23)"``, ``"35"``, ``"None"``; UTKFace integer ages) map to a group by the rule in the
README: a bare number ``n`` is the range (n, n); a tuple is sorted; the group with the largest
overlap wins, then the smallest distance, and ties go to the older group.
"""

from __future__ import annotations

import re

AGE_GROUPS: tuple[str, ...] = ("0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60-100")
GENDERS: tuple[str, ...] = ("male", "female")
AGE_BOUNDS: tuple[tuple[int, int], ...] = tuple(
    (int(lo), int(hi)) for lo, hi in (g.split("-") for g in AGE_GROUPS)
)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GENDER_ALIASES = {"m": 0, "male": 0, "man": 0, "0": 0, "f": 1, "female": 1, "woman": 1, "1": 1}


def age_range_to_group(lo: float, hi: float) -> int:
    """Index of the age group that best matches the closed range [lo, hi]."""
    lo, hi = sorted((float(lo), float(hi)))
    best_key, best = None, -1
    for i, (glo, ghi) in enumerate(AGE_BOUNDS):
        overlap = min(hi, ghi) - max(lo, glo)
        distance = max(glo - hi, lo - ghi, 0.0)
        # larger overlap first, then smaller distance, ties to the older (later) group
        key = (overlap if overlap >= 0 else -1.0, -distance, i)
        if best_key is None or key > best_key:
            best_key, best = key, i
    return best


def age_to_group(raw: object) -> int | None:
    """Map a raw age label to a group index, or None when there is no usable label.

    Accepts ints/floats (an exact age), Adience strings (``"(25, 32)"``, ``"35"``), a group name
    (``"25-32"``), and ``None``/``"None"``/empty/unparseable strings (-> None).
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        if raw != raw or raw < 0:  # NaN or negative
            return None
        return age_range_to_group(raw, raw)
    text = str(raw).strip()
    if text in AGE_GROUPS:
        return AGE_GROUPS.index(text)
    numbers = [float(n) for n in _NUMBER.findall(text)]
    if not numbers or len(numbers) > 2 or any(n < 0 for n in numbers):
        return None
    if len(numbers) == 1:
        return age_range_to_group(numbers[0], numbers[0])
    return age_range_to_group(numbers[0], numbers[1])


def age_in_group(age: float) -> bool:
    """True when an exact age lies inside one of the groups (only those have an exact answer)."""
    return any(lo <= age <= hi for lo, hi in AGE_BOUNDS)


def gender_to_index(raw: object) -> int | None:
    """Map ``m``/``f``/``male``/``female``/0/1 to 0 (male) or 1 (female); anything else -> None."""
    if raw is None or isinstance(raw, bool):
        return None
    key = str(raw).strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    return _GENDER_ALIASES.get(key)
