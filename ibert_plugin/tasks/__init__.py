"""Fairseq task registrations of the plugin (``--task squad``) and the criteria that go with them."""
from ..criterions import squad_span  # noqa: E402,F401
from . import squad  # noqa: F401  (registers the squad task and the squad_span / squad_span_distill criteria)
