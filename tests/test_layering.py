"""Layering of the package (README "Layout"): no import cycle, quant/ and engine/ never import fairseq or upward.

* a static graph of the import statements that run at import time (module level, class bodies, top-level
  ``if``/``try``; not function bodies) over every ``ibert_plugin`` module must be acyclic;
* room rules on that graph, one per room (a room is the first name under ``ibert_plugin``; :data:`ROOMS` says
  which rooms each may import, counting imports inside functions unless noted, and whether it may import fairseq
  itself; :data:`INSIDE_FUNCTIONS` what a room may import only inside functions, never at import time). From the
  bottom:

  * ``_cext`` (the C++ extension loader), ``catalog`` (the task and architecture tables) and ``stats`` import
    nothing of the plugin;
  * ``quant`` only ``quant`` and ``_cext``; ``engine`` only ``engine``, ``quant`` and ``_cext`` at import time (its
    CLI reads checkpoints and GLUE files inside functions);
  * the fairseq side: ``wiring`` (``quant``), ``models`` (``quant``), ``criterions`` and ``tasks`` (``quant.config``
    and the fairseq-free span primitives of ``squad``); ``assets`` (``catalog``); ``export`` (``quant``, ``wiring``);
  * the span primitives ``squad.{data,features,head,metrics,postprocess,evaluate}`` import only each other, the
    WordPiece tokenizer of ``assets`` and (``evaluate``, inside functions) ``engine``: no ``recipes``, ``wiring`` or
    ``tasks``, since the fairseq task and criterion import them;
  * the drivers: ``recipes`` (``run.py``: the GLUE recipes and the SQuAD driver ``recipes.squad``, whose
    ``python -m ibert_plugin.squad`` alias ``squad.__main__`` counts in this room; the stage runner and the scoring
    the demo and the benchmarks share) imports at import time only ``catalog``, ``quant.config``, the fairseq-free
    ``wiring.checkpoint_file`` / ``wiring.lifetime`` and the span primitives of ``squad``; inside functions also
    ``wiring`` (checkpoint and packed-model loading), ``tasks.squad`` (the SQuAD dictionary), ``engine``, ``assets``
    (the GLUE label reader of ``recipes.scoring``) and fairseq itself (``recipes.scoring`` loads the checkpoint it
    scores); ``demo`` only ``quant.config`` (its presets), ``assets.common`` (the data folder), ``recipes`` (stages
    and scoring) and ``stats``; the package ``__init__`` only ``wiring``;
* every module imports alone in a fresh interpreter (a forked child of a process that has not imported the plugin),
  and the ``catalog`` / ``quant`` / ``engine`` / ``recipes`` ones leave ``fairseq`` out of ``sys.modules``.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ibert_plugin"


def module_names() -> Dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = module_names()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str, eager_only: bool = True) -> Set[str]:
    """Plugin modules ``mod`` imports (``eager_only``: only the statements that run when ``mod`` is imported)."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: Set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if eager_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, is_pkg, child)
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    found.add(sub if sub in MODULES else target)
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES or m.split(".")[0] == "fairseq"}


def test_static_import_graph_is_acyclic():
    graph = {m: {t for t in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    state: Dict[str, int] = {}
    stack = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


#: The span primitives of the SQuAD room: below the fairseq task and criterion that import them.
SQUAD_PRIMITIVES = {"data", "features", "head", "metrics", "postprocess", "evaluate"}


def _room_of(mod: str) -> str:
    """``_room``, except that ``squad.__main__`` (``python -m ibert_plugin.squad``, an alias of the SQuAD driver
    ``recipes.squad``) counts in the ``recipes`` room: the ``squad`` room holds only the span primitives."""
    parts = mod.split(".")
    if _room(mod) == "squad" and len(parts) > 2 and parts[2] not in SQUAD_PRIMITIVES:
        return "recipes"
    return _room(mod)


_SPAN = {"squad.data", "squad.features", "squad.head", "squad.metrics", "squad.postprocess"}
#: room -> (rooms or modules it may import, only the imports that run at import time, may import fairseq itself)
ROOMS = {
    "": ({"wiring"}, False, False),  # the package __init__ (registers the plugin with fairseq)
    "_cext": (set(), False, False),
    "catalog": (set(), False, False),
    "stats": (set(), False, False),
    "quant": ({"quant", "_cext"}, False, False),
    "engine": ({"engine", "quant", "_cext"}, True, False),
    "wiring": ({"wiring", "quant"}, False, True),
    "models": ({"models", "quant"}, False, True),
    "criterions": ({"criterions", "quant.config", "squad.head"}, False, True),
    "tasks": ({"tasks", "criterions", "quant.config"} | _SPAN, False, True),
    "assets": ({"assets", "catalog"}, False, True),
    "export": ({"export", "quant", "wiring"}, False, False),
    "squad": ({"squad", "assets.wordpiece_bpe", "engine"}, False, False),
    "recipes": ({"recipes", "catalog", "quant.config", "wiring.checkpoint_file", "wiring.lifetime", "squad"},
                False, False),
    "demo": ({"demo", "quant.config", "assets.common", "recipes", "stats"}, False, False),
}
#: room -> rooms or modules (and ``fairseq``) it may import inside functions only, on top of its ROOMS entry
INSIDE_FUNCTIONS = {
    "recipes": {"wiring", "tasks.squad", "engine", "assets", "fairseq"},
}


def test_every_room_has_a_rule():
    assert {_room_of(m) for m in MODULES} == set(ROOMS)


def _breaks_rule(mod: str, target: str, at_import: bool = True) -> bool:
    """Whether ``mod`` importing ``target`` (``at_import``: at import time, else only inside functions) breaks the
    rule of ``mod``'s room (an allowed entry with a dot names a module or package, one without a room)."""
    allowed, _, fairseq_ok = ROOMS[_room_of(mod)]
    if not at_import:
        allowed = allowed | INSIDE_FUNCTIONS.get(_room_of(mod), set())
    if target.split(".")[0] == "fairseq":
        return not (fairseq_ok or "fairseq" in allowed)
    if target not in MODULES or target == "ibert_plugin":
        return False
    where = target.split(".", 1)[1]
    return not (_room_of(target) in allowed | {_room_of(mod)} or where in allowed
                or any(where.startswith(a + ".") for a in allowed if "." in a))


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_rooms_import_only_downward(room):
    eager_only = ROOMS[room][1]
    bad = [f"{mod} -> {t}" for mod in MODULES if _room_of(mod) == room
           for t in imports_of(mod, eager_only=eager_only) if _breaks_rule(mod, t, at_import=t in imports_of(mod))]
    assert not bad, bad


def test_inside_function_rules_name_rooms_with_rules():
    assert set(INSIDE_FUNCTIONS) <= set(ROOMS)


#: where an import statement runs: at import time, or inside a function only
AT_IMPORT, IN_FUNCTION = True, False


@pytest.mark.parametrize("mod,target,at_import,breaks", [
    ("ibert_plugin.recipes.scoring", "fairseq.checkpoint_utils", AT_IMPORT, True),  # fairseq at import time
    ("ibert_plugin.recipes.scoring", "ibert_plugin.assets.glue", AT_IMPORT, True),
    ("ibert_plugin.recipes.stages", "ibert_plugin.wiring.checkpoint", AT_IMPORT, True),
    ("ibert_plugin.demo", "fairseq", AT_IMPORT, True),  # the demo scores through recipes.scoring
    ("ibert_plugin.demo", "ibert_plugin.recipes.stages", AT_IMPORT, False),
    ("ibert_plugin.squad.features", "ibert_plugin.recipes.squad", AT_IMPORT, True),  # a span primitive above its driver
    ("ibert_plugin.squad.evaluate", "ibert_plugin.recipes.plan", AT_IMPORT, True),
    ("ibert_plugin.squad.head", "fairseq.models", AT_IMPORT, True),
    ("ibert_plugin.squad.__main__", "ibert_plugin.recipes.squad", AT_IMPORT, False),  # the alias of the driver
    ("ibert_plugin.recipes.squad", "ibert_plugin.recipes.plan", AT_IMPORT, False),
    ("ibert_plugin.recipes.squad", "ibert_plugin.squad.data", AT_IMPORT, False),  # fairseq-free span primitives
    ("ibert_plugin.recipes.squad", "ibert_plugin.tasks.squad", AT_IMPORT, True),  # fairseq at import time
    ("ibert_plugin.recipes.squad", "ibert_plugin.wiring.checkpoint", AT_IMPORT, True),
    ("ibert_plugin.recipes.execute", "ibert_plugin.recipes.squad", AT_IMPORT, False),
    ("ibert_plugin.recipes.plan", "ibert_plugin.wiring.checkpoint", AT_IMPORT, True),
    ("ibert_plugin.catalog", "ibert_plugin.quant.config", AT_IMPORT, True),
    ("ibert_plugin.assets.glue", "ibert_plugin.catalog", AT_IMPORT, False),
    ("ibert_plugin.assets.glue", "ibert_plugin.recipes.plan", AT_IMPORT, True),
    ("ibert_plugin.tasks.squad", "ibert_plugin.recipes.squad", AT_IMPORT, True),
    ("ibert_plugin.recipes.scoring", "fairseq.checkpoint_utils", IN_FUNCTION, False),  # scoring a checkpoint
    ("ibert_plugin.recipes.scoring", "ibert_plugin.assets.glue", IN_FUNCTION, False),  # the GLUE label reader
    ("ibert_plugin.recipes.squad", "ibert_plugin.tasks.squad", IN_FUNCTION, False),  # the SQuAD dictionary
    ("ibert_plugin.recipes.squad", "ibert_plugin.wiring.checkpoint", IN_FUNCTION, False),  # scoring a stage
    ("ibert_plugin.recipes.squad", "ibert_plugin.models.ibert_roberta", IN_FUNCTION, True),
    ("ibert_plugin.recipes.stages", "ibert_plugin.criterions.distill", IN_FUNCTION, True),
    ("ibert_plugin.squad.features", "ibert_plugin.recipes.squad", IN_FUNCTION, True),
    ("ibert_plugin.quant.config", "fairseq", IN_FUNCTION, True),
    ("ibert_plugin.demo", "fairseq", IN_FUNCTION, True),
])
def test_the_rules_tell_a_bad_import(mod, target, at_import, breaks):
    assert _breaks_rule(mod, target, at_import) == breaks


CHILD = textwrap.dedent("""
    import importlib, json, os, sys
    import numpy, torch  # shared by every child: imported once, before the fork
    names = json.loads(sys.argv[1])
    results, running = {}, {}

    def reap():
        pid, _ = os.wait()
        name, r = running.pop(pid)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        results[name] = json.loads(data or b'{"ok": false, "error": "child died"}')

    for name in names:
        if len(running) >= 2:  # two at a time (two cores)
            reap()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                msg = {"ok": True, "fairseq": "fairseq" in sys.modules}
            except BaseException as e:
                msg = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(msg).encode())
            os._exit(0)
        os.close(w)
        running[pid] = (name, r)
    while running:
        reap()
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_every_module_imports_alone_and_low_rooms_without_fairseq():
    names = [m for m in MODULES if not m.endswith("__main__")]
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(names)], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                   "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    assert not failed, failed
    leaky = [m for m, r in results.items() if _room(m) in ("catalog", "quant", "engine", "recipes") and r["fairseq"]]
    assert not leaky, f"import fairseq: {leaky}"
    assert not results["ibert_plugin"]["fairseq"]
    assert results["ibert_plugin.wiring.checkpoint"]["fairseq"]  # the check can see a fairseq import


REGISTRY_CHECK = textwrap.dedent("""
    import sys
    from fairseq import options
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.models import ARCH_MODEL_REGISTRY
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["data", "--user-dir", sys.argv[1], "--task", "sentence_prediction",
                                                "--arch", "ibert_roberta_tiny", "--criterion", "ternary_distill"])
    import torch, argparse
    assert args.arch == "ibert_roberta_tiny" and args.criterion == "ternary_distill"
    assert "hf_wordpiece" in REGISTRIES["bpe"]["registry"]
    assert "ternary_distill" in CRITERION_REGISTRY and "ibert_roberta_minilm" in ARCH_MODEL_REGISTRY
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    print("registered")
""")


@pytest.mark.parametrize("first", [
    "",  # fairseq-train --user-dir ibert_plugin: fairseq first, the plugin through import_user_module
    "import ibert_plugin.quant",  # the plugin first (fairseq's import_user_module then skips it)
    "import ibert_plugin.criterions.distill",  # a fairseq-side plugin module that imports fairseq itself
])
@pytest.mark.slow
def test_fairseq_sees_every_registration(first):
    code = first + "\n" + REGISTRY_CHECK
    p = subprocess.run([sys.executable, "-c", code, str(PKG)], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stdout.strip() == "registered", p.stderr[-3000:]
