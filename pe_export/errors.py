"""The one exception type the CLI turns into exit code 2 (bad input).

Parameter dataclasses raise plain `ValueError` (house style); I/O and file-format problems raise
`BadInput`, a `ValueError` too, so callers catch one type.
"""


class BadInput(ValueError):
    """Input the user can fix: the message names the problem and the valid range."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters (its type when it has none)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
