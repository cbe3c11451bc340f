"""DistributedDataParallel under torchrun: two CPU processes over gloo end with identical weights."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open


def test_two_gloo_processes_keep_identical_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={"BDSERVE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
                                                         "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    with safe_open(tmp_path / "rank0.safetensors", "pt") as f:
        assert f.metadata()["world"] == "2"
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Training really moved the weights away from their seeded initialisation.
    torch.manual_seed(0)
    from bdserve.training.models import create_model

    init = create_model("tiny").state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if a[k].is_floating_point())
