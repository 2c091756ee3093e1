"""Build the plugin's C++ extensions once, side by side, before the tests or the demo need them (``make kernels``).

The engine's fused kernels, its fbgemm GEMMs and the fused QAT kernels are each compiled on first use by
``torch.utils.cpp_extension`` (about a minute each on 2 cores); building them here, in parallel, is the install-time
step a compiled package would have. Idempotent: already built extensions load in a second. An extension that cannot
be built is reported and left to its runtime fallback (the ORT GEMM routes, the PyTorch QAT path); the engine's own
kernels are required (exit 1 without them).
"""
import concurrent.futures as cf
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(name: str):
    t0 = time.perf_counter()
    try:
        if name == "engine kernels":
            from ibert_plugin.engine import kernels

            kernels.load()
            ok, why = True, ""
        elif name == "fbgemm GEMMs":
            from ibert_plugin.engine import kernels

            ok = kernels.load_fbgemm() is not None
            why = "" if ok else str(kernels.fbgemm_error())
        else:
            import warnings

            from ibert_plugin.quant import fused

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ok = fused.load() is not None
            why = "" if ok else (fused.error() or "disabled by IBERT_QAT_KERNELS=0")
    except Exception as e:  # noqa: BLE001  (reported below, per extension)
        ok, why = False, f"{type(e).__name__}: {e}".splitlines()[0]
    return name, ok, why, time.perf_counter() - t0


def main() -> int:
    names = ["engine kernels", "fbgemm GEMMs", "QAT kernels"]
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=len(names)) as ex:
        results = list(ex.map(_build, names))
    for name, ok, why, dt in results:
        print(f"[kernels] {name}: {'ok' if ok else 'NOT BUILT (' + why + '; runtime fallback)'} ({dt:.0f} s)")
    print(f"[kernels] done in {time.perf_counter() - t0:.0f} s")
    if not results[0][1]:
        print(f"error: the engine's C++ kernels did not build: {results[0][2]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
