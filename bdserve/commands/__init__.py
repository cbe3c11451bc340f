"""Subcommands of the bdserve CLI, one module each."""
