"""Console entry points for the commands that need an optional extra.

A missing extra gives one line that says what to install, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

_HINT = 'error: {cmd} needs the "{extra}" extra ({missing} is not installed): pip install "agegender[{extra}]"'


def _missing(extra_modules: tuple[str, ...]) -> str | None:
    for name in extra_modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _run(cmd: str, extra: str, modules: tuple[str, ...], target: str) -> None:
    missing = _missing(modules)
    if missing is not None:
        print(_HINT.format(cmd=cmd, extra=extra, missing=missing), file=sys.stderr)
        sys.exit(1)
    module_name, func = target.split(":")
    getattr(importlib.import_module(module_name), func)()


def train_adience() -> None:
    _run("train-adience", "train", ("torch", "timm", "albumentations", "pandas", "sklearn", "matplotlib"),
         "agegender.train.cli:main")


def export_onnx() -> None:
    _run("export-onnx", "export", ("torch", "timm", "onnx"), "agegender.export.cli:main")
