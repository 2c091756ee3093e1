"""A non-editable ``pip install .`` into a fresh venv carries everything the engine needs, and it builds and runs.

The venv reuses the project venv's packages (torch, numpy, onnxruntime) through a ``.pth`` line, so nothing is
downloaded; the project venv's own ``.pth`` hooks (the editable install of this checkout) are not processed, so the
installed copy is the only ``ibert_plugin`` the child can see. The engine's C++ kernels are compiled from the
installed sources (into a temporary build folder) and checked against the installed QAT softmax.
"""
from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a pip install and a C++ build into a fresh venv: left out by `make test-fast`

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    from importlib.metadata import version
    from pathlib import Path
    import ibert_plugin, ibert_plugin.engine
    from ibert_plugin.engine import kernels
    from ibert_plugin.quant import nonlinear as NL
    import torch
    root = Path(ibert_plugin.__file__).resolve().parent
    assert str(root).startswith(sys.prefix), root  # the installed copy, not the checkout
    assert (root / "engine" / "kernels.cpp").is_file() and (root / "engine" / "fbgemm_gemm.cpp").is_file()
    assert (root / "quant" / "qat_kernels.cpp").is_file()
    assert "fairseq" not in sys.modules
    assert version("ibert_plugin") == ibert_plugin.__version__  # pyproject.toml reads the one version string
    K = kernels.load()
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([2.0e-3])
    scores = torch.randint(-6000, 6000, (2, 2, 16, 16), generator=g, dtype=torch.int32)
    mask = torch.zeros(2, 16, dtype=torch.uint8)
    mask[1, 9:] = 1
    out = torch.empty(2, 2, 16, 16, dtype=torch.uint8)
    K.softmax_u8(scores, mask, NL.exp_lut(s), out)
    assert torch.equal(out.float(), NL.int_softmax(scores.float(), s, mask)[0])
    print("engine ok", root)
""")


def test_non_editable_install_builds_and_runs_the_engine(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "ibert_plugin", src / "ibert_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "project_deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(deps)))
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "--no-build-isolation", "--no-cache-dir", "--quiet", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert not (purelib / "ibert_plugin").is_symlink() and (purelib / "ibert_plugin" / "engine").is_dir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "IBERT_ENGINE_BUILD_DIR": str(tmp_path / "build"), "HOME": str(tmp_path)}
    p = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0 and "engine ok" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
