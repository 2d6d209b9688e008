"""kvstore/runtime.py: the GC settings of node and bench processes (run in a subprocess, so this
test process keeps its own settings)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import gc, weakref
    from kvstore.runtime import GC_GEN0_THRESHOLD, tune_gc

    class Node:
        pass

    started = [Node() for _ in range(1000)]   # what startup built: frozen, never scanned again
    tune_gc()
    assert gc.isenabled()
    assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD, gc.get_threshold()
    assert gc.get_freeze_count() >= len(started), gc.get_freeze_count()

    # a cycle made after startup is still freed once enough young objects pile up
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    junk = [[] for _ in range(2 * GC_GEN0_THRESHOLD)]
    del junk
    assert gone() is None, "a cycle made after tune_gc() was never collected"
    print("ok")
""")


def test_tuned_process_freezes_startup_objects_and_still_collects_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
