"""Static check of the device rules (README "Project rules": device-agnostic numerics, no host syncs in forward) over
``ibert_plugin/quant`` and ``ibert_plugin/models``: no ``.item()``, ``.cpu()``, ``.cuda()``, ``.numpy()`` or
``.tolist()`` call, and no tensor factory (``torch.zeros``, ``torch.tensor``, ``torch.arange`` ...) without ``device=``,
outside the explicit allow-list below of code that never runs in a forward or backward pass.

``*_like`` factories and ``Tensor.new_*`` take the device of their template and are always fine. The runtime side
(everything the training step and the eval forward actually execute, on the ``meta`` device) is
``tests/test_device_agnostic.py``; this check also covers branches that test does not take.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
SCOPE = ("ibert_plugin/quant", "ibert_plugin/models")

#: Tensor methods that copy values to the host or pin a device.
HOST_METHODS = {"item", "cpu", "cuda", "numpy", "tolist"}
#: ``torch.<name>(...)`` factories that default to the CPU.
FACTORIES = {"tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "scalar_tensor", "empty_strided"}

#: (file, function qualified name or "*" for the whole file, or "<module>") -> why it is not a forward path.
ALLOWED: Dict[Tuple[str, str], str] = {
    # the integer audit is a debugging tool that reads values on the host by design (its docstring says so)
    ("ibert_plugin/quant/audit.py", "*"): "debugging tool, host reads by design",
    # buffers registered at construction follow the module on .to(device) (and load_state_dict)
    ("ibert_plugin/quant/modules.py", "QuantAct.__init__"): "construction-time buffer",
    ("ibert_plugin/quant/modules.py", "IntLayerNorm.__init__"): "construction-time buffer",
    ("ibert_plugin/quant/ternary.py", "LATWeightQuantizer.__init__"): "construction-time buffer",
    ("ibert_plugin/quant/packing.py", "FrozenWeightQuantizer.__init__"): "construction-time buffer",
    # packing and unpacking of exported checkpoints happen on the host, outside any forward
    ("ibert_plugin/quant/packing.py", "<module>"): "export: the base-3 digit table of the ternary packing",
    ("ibert_plugin/quant/packing.py", "pack_ternary"): "export: packs weights into host bytes",
    ("ibert_plugin/quant/packing.py", "unpack_ternary"): "checkpoint loading: unpacks host bytes",
    ("ibert_plugin/quant/packing.py", "pack_state"): "export: writes the packed checkpoint on the host",
}


def _violations(path: Path) -> List[Tuple[str, int, str]]:
    """``(qualified function name, line, what)`` of every rule break in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: List[Tuple[str, int, str]] = []

    def visit(node: ast.AST, scope: List[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                name = child.func.attr
                qual = ".".join(scope) or "<module>"
                base = child.func.value
                if name in HOST_METHODS and not (isinstance(base, ast.Name) and base.id in ("torch", "np", "math")):
                    found.append((qual, child.lineno, f".{name}()"))
                elif (name in FACTORIES and isinstance(base, ast.Name) and base.id == "torch"
                      and not any(k.arg == "device" for k in child.keywords)):
                    found.append((qual, child.lineno, f"torch.{name}(...) without device="))
            visit(child, scope)

    visit(tree, [])
    return found


def _scan() -> List[Tuple[str, str, int, str]]:
    out = []
    for folder in SCOPE:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for qual, line, what in _violations(path):
                if (rel, "*") in ALLOWED or (rel, qual) in ALLOWED:
                    continue
                out.append((rel, qual, line, what))
    return out


def test_no_host_sync_or_deviceless_factory_outside_the_allow_list():
    bad = _scan()
    assert not bad, "device rules broken (fix, or allow-list a non-forward use with its reason):\n  " + "\n  ".join(
        f"{rel}:{line} in {qual}: {what}" for rel, qual, line, what in bad)


def test_every_allow_list_entry_is_still_needed():
    """An allow-list entry whose code no longer breaks a rule must go (the list stays the exact set of exceptions)."""
    used = set()
    for folder in SCOPE:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for qual, _, _ in _violations(path):
                used.add((rel, "*") if (rel, "*") in ALLOWED else (rel, qual))
    assert set(ALLOWED) <= used, f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_the_scanner_sees_each_kind_of_break(tmp_path):
    src = tmp_path / "planted.py"
    src.write_text(
        "import torch\n"
        "class M:\n"
        "    def forward(self, x):\n"
        "        a = x.sum().item()\n"
        "        b = torch.zeros(3)\n"
        "        c = torch.arange(4, device=x.device)\n"
        "        d = torch.zeros_like(x)\n"
        "        return x.cpu(), x.tolist(), x.numpy(), torch.full((1,), 2.0)\n"
        "def f(x):\n"
        "    return torch.tensor([1.0], dtype=x.dtype, device=x.device), x.new_zeros(2)\n"
    )
    got = {(q, w) for q, _, w in _violations(src)}
    assert got == {("M.forward", ".item()"), ("M.forward", "torch.zeros(...) without device="),
                   ("M.forward", ".cpu()"), ("M.forward", ".tolist()"), ("M.forward", ".numpy()"),
                   ("M.forward", "torch.full(...) without device=")}
