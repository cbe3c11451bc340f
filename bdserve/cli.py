"""The ``bdserve`` command. Each subcommand lives in its own module under
bdserve/commands and registers itself; heavy imports (torch, onnxruntime) happen
inside the commands so that ``bdserve --help`` stays instant."""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    name="bdserve",
    help="Defense-as-a-service for image classifiers against backdoor triggers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: typer's rich help labels every flag <bool> though flags take no value
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


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="On failure, show the full traceback instead of one line "
                               "(also accepted after the subcommand, or BDSERVE_DEBUG=1)."),
) -> None:
    """Defense-as-a-service for image classifiers against backdoor triggers."""


TRUE_WORDS, FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def flag_values_read(args: list[str]) -> list[str]:
    """Flags take no value, but ``--enhanced true`` (or ``=false``) is what people type: read the word
    instead of failing with "unexpected extra argument". Only the invoked command's flags are touched."""
    cmd, rest = typer.main.get_command(app), list(args)
    for tok in rest:  # walk down the subcommand path
        if tok in (getattr(cmd, "commands", None) or {}):
            cmd = cmd.commands[tok]
        elif not tok.startswith("-"):
            break
    flags = {}  # flag -> what "false" means: its negation, or None (leave it out)
    for p in getattr(cmd, "params", []):
        if getattr(p, "is_bool_flag", False):  # typer's own option class, not click.Option
            for name in p.opts:
                flags[name] = p.secondary_opts[0] if p.secondary_opts else None
            for name in p.secondary_opts:
                flags[name] = p.opts[0]
    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        name, eq, word = tok.partition("=")
        if not eq and name in flags and i + 1 < len(rest) and rest[i + 1].lower() in TRUE_WORDS | FALSE_WORDS:
            word, i = rest[i + 1], i + 1
        if name in flags and word.lower() in TRUE_WORDS:
            out.append(name)
        elif name in flags and word.lower() in FALSE_WORDS:
            out += [flags[name]] if flags[name] else []
        else:
            out.append(tok)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the command; a failure prints one line on stderr (``--debug`` anywhere: the traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("BDSERVE_DEBUG", "") not in ("", "0")
    from bdserve.commands.train import bare_enhanced_means_shrinkpad

    args = flag_values_read(bare_enhanced_means_shrinkpad([a for a in args if a != "--debug"]))
    try:
        app(args=args, prog_name="bdserve")
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure ends as one line
        if debug:
            raise
        from bdserve.cli_errors import report

        sys.exit(report(e))


if __name__ == "__main__":
    main()
