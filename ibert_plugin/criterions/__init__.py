"""Fairseq criterion registrations."""
from . import distill  # noqa: F401  (registers ternary_distill)
