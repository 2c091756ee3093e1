"""Fairseq model registrations."""
from . import ibert_roberta  # noqa: F401
