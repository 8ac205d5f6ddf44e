"""The JSON types of an encoding's parameters, checked before its dataclass validates the values.

A spec read from a file (`pe_export.spec` metadata) can hold any JSON: a `theta` of "10000" would reach
the dataclass's `theta > 0` and fail as Python's "'>' not supported between instances of 'str' and 'int'".
Checked here against each field's annotation (`float`, `int | None`, `list[float] | None`, ...), the error
names the parameter and the type it takes, as `pe-export from-config` names a config key.
"""

from __future__ import annotations

import dataclasses

# annotation name -> (accepted JSON types, what the message calls them); bool is never a number
TYPES = {
    "float": ((int, float), "a number"),
    "int": ((int,), "an integer"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "dict": ((dict,), "a JSON object"),
    "list": ((list, tuple), "a list"),
    "tuple": ((list, tuple), "a list"),
}


def expected(annotation) -> list[str]:
    """The TYPES names an annotation allows ("None" included), [] when it names none of them (not checked)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip().split("[")[0] for part in text.split("|")]
    return names if all(n in TYPES or n == "None" for n in names) else []


def type_error(cls, params: dict) -> str | None:
    """None when every parameter of `params` that `cls` declares has its annotated JSON type, else
    "theta must be a number, got 'abc' (str)". A `cls` that is no dataclass (a wrapper that parses its
    parameters itself) is left to its own checks."""
    if not dataclasses.is_dataclass(cls):
        return None
    for f in dataclasses.fields(cls):
        if f.name not in params:
            continue
        names, value = expected(f.type), params[f.name]
        if not names or (value is None and "None" in names):
            continue
        ok = any(
            isinstance(value, TYPES[n][0]) and (n == "bool" or not isinstance(value, bool))
            for n in names
            if n != "None"
        )
        if not ok:
            kinds = " or ".join(dict.fromkeys(TYPES[n][1] for n in names if n != "None"))
            null = " (or null)" if "None" in names else ""
            return f"{f.name} must be {kinds}{null}, got {value!r} ({type(value).__name__})"
    return None
