"""Explanations that are not models: figures, post-hoc methods and metrics over any model."""

from . import prototype_localisation  # noqa: F401,E402 - registers explain(localisation=...) methods of prototype models
from . import extremal, xrai  # noqa: F401,E402 - register attribute(method="xrai" / "extremal" / "meaningful")
