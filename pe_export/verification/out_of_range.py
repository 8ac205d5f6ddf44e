"""`--probe-bounds`: feed each runtime positions outside [0, P) and say which return a result anyway
(SILENT), which kill their process (ABORTS), and which fail loudly."""

from __future__ import annotations

from dataclasses import dataclass

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.probing import make_probes
from pe_export.errors import one_line
from pe_export.runtimes import DEFAULT_RUNTIMES, RUNTIMES, Skip, Unsupported
from pe_export.spec import Spec

# Out-of-range positions


def bounds_probes(spec: Spec, seed: int = 0) -> list[tuple[str, dict]]:
    """A valid probe with one position moved to -1, and one moved to the table length."""
    enc = encoding_for(spec)
    P = enc.parse(spec).max_positions
    name, template = make_probes(spec, seed, 1)[0]
    keys = [k for k in template if k.endswith("position_ids") or k.endswith("positions")]
    if not keys:
        return []
    cases = []
    for bad in (-1, P):
        inputs = {k: v.copy() for k, v in template.items()}
        inputs[keys[0]].reshape(-1)[-1] = bad
        cases.append((f"{keys[0]} {bad}", inputs))
    return cases


@dataclass
class BoundsRow:
    runtime: str
    # "loud": fails loudly, an error for every bad position; "ABORTS": aborts the process (or hangs) on
    # some, so a caller must guard positions before calling it; "SILENT": returns a result for some (the
    # worst: a wrong answer nobody sees; a runtime both silent and aborting is SILENT); or "skipped"
    verdict: str
    note: str = ""


def probe_bounds(
    spec: Spec, model_bytes: bytes, runtimes=DEFAULT_RUNTIMES, seed: int = 0, timeout: float | None = None
) -> list[BoundsRow]:
    """Feed each runtime positions outside [0, P) and report the ones that return a result anyway, and
    those whose process dies on them (each bad position gets a fresh process after a crash)."""
    from pe_export.runtimes import worker

    timeout = worker.TIMEOUT_S if timeout is None else timeout
    cases = bounds_probes(spec, seed)
    rows = []
    if cases:
        worker.start(runtimes, RUNTIMES)
    for name in runtimes:
        if not cases:
            rows.append(BoundsRow(name, "skipped", f"{spec.encoding} takes no position inputs"))
            continue
        silent, aborts, call, skipped = [], [], None, None
        for case, inputs in cases:
            try:
                if call is None:
                    call, _ = worker.load(name, RUNTIMES[name], spec, model_bytes, timeout)
            except Skip as e:
                skipped = str(e)
                break
            except (worker.Crash, worker.Timeout, Unsupported, Exception) as e:
                skipped = "cannot load: " + one_line(e, 200).removeprefix("cannot load: ")
                break
            try:
                call(inputs)
                silent.append(case)
            except (worker.Crash, worker.Timeout) as e:
                aborts.append(f"{case} ({one_line(e, 400)})")
                call = None  # its process is gone: the next case loads the model into a new one
            except Exception:  # any error is a loud failure, which is what we want
                pass
        if skipped is not None:
            rows.append(BoundsRow(name, "skipped", skipped))
            continue
        notes = (["returned a result for " + ", ".join(silent)] if silent else []) + (
            ["aborts the process on " + ", ".join(aborts)] if aborts else []
        )
        rows.append(BoundsRow(name, "SILENT" if silent else "ABORTS" if aborts else "loud", "; ".join(notes)))
    return rows
