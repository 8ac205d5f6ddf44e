"""How a runtime can decline or fail to run a graph, apart from a wrong answer: the exceptions its
adapter (pe_export.runtimes) or its worker process (pe_export.runtimes.worker) raise, each a row of its own.
A leaf, so that adapters, the worker and the Node side of ort-web share them without importing each other.
"""


class Skip(Exception):
    """This runtime cannot run this file here; the message says why."""


class Unsupported(Exception):
    """This runtime is here but rejects this graph (an op, a dtype or a shape it does not handle): the
    message says what it could not load or convert."""


class Crash(Exception):
    """The runtime's process died (a signal, an abort, a panic); the message has the signal and the
    last line of its stderr."""


class Timeout(Exception):
    """The runtime did not answer within the time limit; its process was killed."""


def verdict_of(e: BaseException) -> str:
    """The row verdict of a runtime's failure: "skipped", "unsupported", "CRASH", "TIMEOUT", else "FAIL"."""
    return {Skip: "skipped", Unsupported: "unsupported", Crash: "CRASH", Timeout: "TIMEOUT"}.get(type(e), "FAIL")
