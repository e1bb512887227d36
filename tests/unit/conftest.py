"""Fixtures of the unit tests beyond tests/conftest.py."""

from gradient_fixtures import gradient_dim, gradient_parts, gradient_setup  # noqa: F401  (pytest fixtures)
