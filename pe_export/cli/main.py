"""The `pe-export` command line (installed as `pe_export.cli`).

`pe-export --help` groups the commands in panels, the most used first: whole models (rewrite, audit),
checks (verify, matrix, inspect, bench, plot), exports (from-config, list, then every preset). The
presets of encodings other than RoPE are built when named (their options come from the encoding's
module, which imports torch), so `--help` and `list` load no torch.

    pe-export PRESET --seq N [-o FILE] [--op ...] [--dtype ...] [--layout ...] [--force]
    pe-export list
    pe-export verify FILE [--runtimes ...] [--positions ...] [--batch N] [--probe-bounds] [--report FILE.json|.md]
    pe-export matrix [--presets ...] [--ops ...] [--dtypes ...] [--runtimes ...] [--quick] [--shard i/n]

Exit codes: 0 success, 1 parity failure (or nothing here could verify), 2 bad input. Bad input
prints one line on stderr, never a traceback, and writes nothing.
"""

from __future__ import annotations

import sys

import typer
import typer.core

from pe_export.cli import bench, export, matrix, rewrite, tools, verify
from pe_export.cli.common import fail
from pe_export.presets import LAYERED_PRESETS, PRESETS

SUBCOMMANDS = (export.app, verify.app, matrix.app, tools.app, bench.app, rewrite.app)  # each CLI module's own Typer app
WHOLE_MODELS, CHECKS, EXPORTS = "Whole models", "Checks", "Exports"
PANELS = {  # help panel of each command, in the order --help shows them
    "rewrite": WHOLE_MODELS,
    "audit": WHOLE_MODELS,
    "verify": CHECKS,
    "matrix": CHECKS,
    "inspect": CHECKS,
    "bench": CHECKS,
    "plot": CHECKS,
    "from-config": EXPORTS,
    "list": EXPORTS,
    **dict.fromkeys(PRESETS, EXPORTS),
    **dict.fromkeys(LAYERED_PRESETS, EXPORTS),  # one file per layer type
}
ALL_PRESETS = (*PRESETS, *LAYERED_PRESETS)
COMMANDS = tuple(c.name for sub in SUBCOMMANDS for c in sub.registered_commands if c.name not in ALL_PRESETS)


class LazyPreset(typer.core.TyperCommand):
    """A preset's command in the help and the command list, built only when it runs or shows its help."""

    def __init__(self, preset):
        help_text = f"{preset.description}. Exports, checks and verifies an ONNX file."
        super().__init__(preset.name, help=help_text, rich_help_panel=EXPORTS)
        self.preset = preset

    def real(self):
        return export.preset_command(self.preset)

    def make_context(self, info_name, args, parent=None, **extra):
        return self.real().make_context(info_name, args, parent=parent, **extra)


class Group(typer.core.TyperGroup):
    """Turns every usage error into one line with exit code 2, and lists the presets for a wrong name;
    holds the commands in PANELS' order, the lazy presets among them."""

    def __init__(self, *args, commands=None, **kw):
        commands = dict(commands or {})
        commands |= {p.name: LazyPreset(p) for p in export.LAZY_PRESETS}
        order = {name: i for i, name in enumerate(PANELS)}
        ordered = dict(sorted(commands.items(), key=lambda item: order.get(item[0], len(order))))
        super().__init__(*args, commands=ordered, **kw)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            fail(
                f"unknown preset or command {name!r}; presets: {', '.join(ALL_PRESETS)}; "
                f"commands: {', '.join(COMMANDS)}"
            )
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # prints the help
                rv = 0
            else:
                message = e.format_message() if hasattr(e, "format_message") else str(e)
                typer.echo(f"pe-export: error: {' '.join(message.split())}", err=True)
                rv = getattr(e, "exit_code", 2)
        except typer.Abort:
            typer.echo("pe-export: aborted", err=True)
            rv = 1
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Export Transformer positional encodings to ONNX graphs verified against PyTorch.",
)
for sub in SUBCOMMANDS:
    for info in sub.registered_commands:
        info.rich_help_panel = PANELS.get(info.name, info.rich_help_panel)
    app.add_typer(sub)


def run():
    app()
