"""Torch-free runtime: face detection + age/gender classification with onnxruntime."""

from agegender.runtime.labels import AGE_GROUPS, GENDERS, age_to_group

__all__ = ["AGE_GROUPS", "GENDERS", "age_to_group"]
