"""The training children's memory allocator (``ibert_plugin.recipes.allocator``): the environment it adds, its
errors, and that a child started with it really runs on jemalloc when the machine has the library."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ibert_plugin.quant.config import ConfigError
from ibert_plugin.recipes.allocator import JEMALLOC_CONF, allocator_env, describe, find_jemalloc

LIB = "libjemalloc.so.2"


def found():
    return LIB


def missing():
    return None


def test_auto_preloads_jemalloc_when_found_and_keeps_the_users_settings():
    env = allocator_env({}, found)
    assert env == {"LD_PRELOAD": LIB, "MALLOC_CONF": JEMALLOC_CONF}
    assert describe(env).startswith("jemalloc (LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1")
    env = allocator_env({"LD_PRELOAD": "/opt/other.so", "MALLOC_CONF": "narenas:2"}, found)
    assert env == {"LD_PRELOAD": f"{LIB}:/opt/other.so", "MALLOC_CONF": "narenas:2"}
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, found) == {}   # already preloaded
    assert allocator_env({}, missing) == {} and describe({}) == "system malloc"


def test_system_and_required_jemalloc_and_bad_values():
    assert allocator_env({"IBERT_CPU_ALLOCATOR": "system"}, found) == {}
    assert allocator_env({"IBERT_CPU_ALLOCATOR": "jemalloc"}, found)["LD_PRELOAD"] == LIB
    with pytest.raises(ConfigError, match="IBERT_CPU_ALLOCATOR=jemalloc but the dynamic loader finds no libjemalloc"):
        allocator_env({"IBERT_CPU_ALLOCATOR": "jemalloc"}, missing)
    with pytest.raises(ConfigError, match="IBERT_CPU_ALLOCATOR='tcmalloc': choose one of auto, jemalloc, system"):
        allocator_env({"IBERT_CPU_ALLOCATOR": "tcmalloc"}, found)


def test_a_child_started_with_it_maps_jemalloc_exactly_when_the_library_exists():
    env = allocator_env({})
    probe = "print(any('jemalloc' in line for line in open('/proc/self/maps')))"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(find_jemalloc() is not None)


def test_benchmark_rejects_bad_counts_with_one_error_line():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_allocator.py"
    p = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: --rounds and --reps must be >= 1"]
