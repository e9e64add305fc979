"""The errors the library raises on bad input. Each message names the problem and the fix."""


class FiseditError(ValueError):
    """Bad input to fisedit-compiler: the message says what is wrong and how to fix it."""


class UnsupportedGraphError(FiseditError):
    """A graph the passes cannot rewrite (raised in strict mode; otherwise we fall back to dense)."""
