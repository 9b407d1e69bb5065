"""The training recipes, ``configs/<family>/<recipe>.yaml``, as package data."""
