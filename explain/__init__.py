"""Explanations that are not models: figures, post-hoc methods and metrics over any model."""
