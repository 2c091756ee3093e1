"""Packaging shim: the metadata, packages and package data are in ``pyproject.toml``.

Kept so that older tools that call ``setup.py`` directly still work; ``pip install --no-deps -e .``
(``scripts/bootstrap.sh``) and a non-editable ``pip install .`` read ``pyproject.toml``.
"""
from setuptools import setup

setup()
