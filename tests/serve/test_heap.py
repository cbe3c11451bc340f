"""The server's heap and the garbage collector (serve/heap.py)."""

import json
import subprocess
import sys

# A fresh interpreter: freezing is for a process that only serves, never for the test runner's.
_PROBE = """
import gc, json
import torch, onnxruntime  # what a served model keeps alive
from bdserve.serve import server  # the web stack and both doors
from bdserve.serve.heap import freeze_startup_objects

before = len(gc.get_objects())
frozen = freeze_startup_objects()
after = len(gc.get_objects())
gc.disable()  # every cycle below waits for the explicit collection
garbage = []
for _ in range(500):  # new cycles after the freeze are still the collector's
    a, b = [], []
    a.append(b); b.append(a)
    garbage.append(a)
del a, b
garbage.clear()
collected = gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "after": after, "collected": collected}))
"""


def test_startup_objects_leave_the_full_collections_and_new_garbage_is_still_collected():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # A full collection used to walk every object torch and the server stack keep alive.
    assert r["before"] > 100_000
    assert r["frozen"] >= r["before"] * 0.9
    assert r["after"] < r["before"] / 20
    assert r["collected"] >= 1000
