"""Packaging for the ``ibert_plugin`` fairseq ``--user-dir`` plugin.

Install in development mode with ``pip install --no-deps -e .`` (``scripts/bootstrap.sh`` does this).
There are deliberately no ``install_requires``: the runtime stack (torch 2.13 CPU, fairseq-fixed built with
``--no-build-isolation --no-deps``) is pinned in ``requirements.txt`` and installed by the bootstrap script, and
declaring ``torch``/``fairseq`` here would let pip resolve a CUDA torch or fairseq's stale pins.

A non-editable ``pip install .`` ships the engine's C++ sources (compiled on first use by
``torch.utils.cpp_extension``) and any JSON data as package data (``tests/test_install.py``).
"""
from setuptools import find_packages, setup

setup(
    name="ibert_plugin",
    version="0.1.0",
    description="I-BERT (integer-only) and TernaryBERT quantization for fairseq RoBERTa encoders (--user-dir plugin)",
    packages=find_packages(include=["ibert_plugin", "ibert_plugin.*"]),
    package_data={"ibert_plugin": ["engine/*.cpp", "quant/*.cpp", "*.json", "*/*.json", "*/*/*.json"]},
    python_requires=">=3.10",
    install_requires=[],
    # Optional: the deployment peers of benchmarks/integer_engine.py (OpenVINO, NNCF); see requirements-bench.txt.
    extras_require={"bench": ["openvino==2026.4.1", "nncf==3.4.0"]},
    zip_safe=False,
)
