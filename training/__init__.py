"""Data, poisoning, model registry, trainer, in-process evaluation and export."""
