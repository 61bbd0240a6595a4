"""Torch-free runtime: face detection + age/gender classification with onnxruntime.

``from . import Predictor`` gives the Python API; the label lists import
without OpenCV or onnxruntime (``Predictor`` and ``Face`` load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .labels import AGE_GROUPS, GENDERS, age_to_group

if TYPE_CHECKING:
    from .predictor import Face, Predictor

__all__ = ["AGE_GROUPS", "GENDERS", "Face", "Predictor", "age_to_group"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "Face"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
