"""The ``bdserve`` command. Each subcommand lives in its own module under
bdserve/commands and registers itself; heavy imports (torch, onnxruntime) happen
inside the commands so that ``bdserve --help`` stays instant."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="bdserve",
    help="Defense-as-a-service for image classifiers against backdoor triggers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# One module per subcommand (or group); each exposes register(app).
COMMAND_MODULES = [
    "train",
    "demo",
    "archive",
    "serve",
    "import_model",
    "eval",
    "calibrate",
    "physical",
    "study",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"bdserve.commands.{_name}").register(app)


def main() -> None:
    from bdserve.commands.train import bare_enhanced_means_shrinkpad

    sys.argv[1:] = bare_enhanced_means_shrinkpad(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
