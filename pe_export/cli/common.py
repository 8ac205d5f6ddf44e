"""What every CLI module shares: the console, the one way to fail, and choice Enums."""

from __future__ import annotations

import shutil
from enum import Enum

import typer
from rich.console import Console

# Tables are wide; when stdout is not a terminal, do not squeeze them into 80 columns.
out = Console(highlight=False, width=max(shutil.get_terminal_size((160, 24)).columns, 100))


def fail(message: str, code: int = 2):
    """One line on stderr, then exit: the CLI's only way to report bad input."""
    typer.echo(f"pe-export: error: {message}", err=True)
    raise typer.Exit(code)


def choices(name: str, values) -> type[Enum]:
    """An Enum of CLI choices made from the tuple the library validates against, never typed twice."""
    return Enum(name, {v: v for v in values}, type=str)


def parse_runtimes(text: str, known=None) -> tuple[str, ...]:
    """--runtimes through the library's one check (pe_export.runtimes.check_names), failing with exit 2."""
    from pe_export.errors import BadInput
    from pe_export.runtimes import RUNTIMES, check_names

    try:
        return check_names(text, RUNTIMES if known is None else known)
    except BadInput as e:
        fail(str(e))
