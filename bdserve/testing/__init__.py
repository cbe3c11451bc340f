"""Test and benchmark harness: real servers on free loopback ports, and a tiny model.

Not used by the product itself; tests/, bench/ and experiments/ import it, so that
one launcher starts ``bdserve serve`` and one ``LocalTorchServe`` starts TorchServe.
"""

from bdserve.testing.launcher import ServeProcess, bdserve_command, free_port, run_cli, served
from bdserve.testing.models import build_tiny_model_dir, sample_images
from bdserve.testing.torchserve import LocalTorchServe

__all__ = ["LocalTorchServe", "ServeProcess", "bdserve_command", "build_tiny_model_dir", "free_port",
           "run_cli", "sample_images", "served"]
