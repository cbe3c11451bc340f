"""bdserve: defense-as-a-service for image classifiers.

Subpackages:
    bdserve.transforms  triggers, defenses and random layers (batched tensor code)
    bdserve.training    data, poisoning, model registry, trainer, export
    bdserve.serve       the defended pipeline and its transports
"""

__version__ = "0.1.0"
