"""Click parameter types shared by every command (the runtime is the bottom layer, so train and
export can use them too)."""

from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A ``click.FloatRange`` that also refuses nan and inf.

    ``FloatRange`` compares with ``<``/``>``, and every comparison with nan is false, so nan passes
    any range (and inf passes an open-ended one); a nan threshold then silently disables a gate.
    """

    def _describe_range(self) -> str:
        return "finite" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):  # type: ignore[override]
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv
