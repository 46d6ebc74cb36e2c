"""The checks a setting or a component argument must pass: a type and a range, each a function
``check(key, value) -> value`` that raises one `KDTuneError` line naming the key, the value and what
is allowed. ``check.what`` names the type (the configs' comments use it) and ``check.outside`` holds
values just outside the range, with which the tests walk every recipe's schema.

Components declare their arguments' ranges with `argument_checks`; `instantiate` and ``kdtune
validate`` run them with the argument's full key (``dataset.max_seq_len``) before building anything.
"""

from typing import Any, Callable

from kdtune.errors import KDTuneError

Check = Callable[[str, Any], Any]
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def _got(value) -> str:
    return f"{value!r}" if not isinstance(value, str) else f"'{value}'"


def _described(check: Check, what: str, outside=()) -> Check:
    check.what = what  # how the configs' comments name the type
    check.outside = list(outside)  # values just outside the range, for the schema-walking test
    return check


def argument_checks(**checks: Check):
    """Declare the checks of a component's arguments (``@argument_checks(max_seq_len=integer(1,
    optional=True))``); `instantiate` and `validate` run them on the arguments a config gives."""

    def attach(component):
        component.argument_checks = checks
        return component

    return attach


def integer(minimum: int | None = None, *, optional: bool = False) -> Check:
    what = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    what += " or null" if optional else ""

    def check(key, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise KDTuneError(f"{key}: expected {what}, got {_got(value)}")
        return value

    return _described(check, what, [] if minimum is None else [minimum - 1])


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           optional: bool = False) -> Check:
    """A real number in [minimum, maximum] (``above``: strictly above ``minimum``)."""
    if minimum is not None and maximum is not None:
        what = f"a number in {'(' if above else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        what = f"a number {'>' if above else '>='} {minimum:g}"
    else:
        what = "a number"
    what += " or null" if optional else ""

    def check(key, value):
        if value is None and optional:
            return None
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value  # NaN
        if not bad and minimum is not None:
            bad = value <= minimum if above else value < minimum
        if not bad and maximum is not None:
            bad = value > maximum
        if bad:
            raise KDTuneError(f"{key}: expected {what}, got {_got(value)}")
        return float(value)

    outside = [] if minimum is None else [minimum if above else minimum - 1e-9]
    return _described(check, what, outside + ([] if maximum is None else [maximum + 1e-9]))


def boolean() -> Check:
    def check(key, value):
        if not isinstance(value, bool):
            raise KDTuneError(f"{key}: expected true or false, got {_got(value)}")
        return value

    return _described(check, "true or false", ["yes"])


def choice(*values, optional: bool = False) -> Check:
    def check(key, value):
        if value is None and optional:
            return None
        if value not in values:
            listed = ", ".join(map(str, values)) + (", null" if optional else "")
            raise KDTuneError(f"{key}: expected one of {listed}, got {_got(value)}")
        return value

    return _described(check, "one of " + ", ".join(map(str, values)) + (", null" if optional else ""), ["none_of_these"])


def text(*, optional: bool = False) -> Check:
    def check(key, value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise KDTuneError(f"{key}: expected a non-empty string{' or null' if optional else ''}, got {_got(value)}")
        return value

    return _described(check, "a string" + (" or null" if optional else ""), [""])


def node(*, component: bool = False, optional: bool = False) -> Check:
    """A mapping (a component node has ``_component_``); checked further where it is built."""

    def check(key, value):
        if value is None and optional:
            return None
        if not isinstance(value, dict) or (component and "_component_" not in value):
            what = "a node with a '_component_' key" if component else "a mapping of options"
            raise KDTuneError(f"{key}: expected {what}{' or null' if optional else ''}, got {_got(value)}")
        return value

    return _described(check, ("a component node" if component else "a mapping") + (" or null" if optional else ""))


def names() -> Check:
    """A list of setting names (a single name is a list of one)."""

    def check(key, value):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise KDTuneError(f"{key}: expected a list of setting names, got {_got(value)}")
        return tuple(value)

    return _described(check, "a list of setting names", [[1]])


def device() -> Check:
    def check(key, value):
        if value in (None, "auto", "cpu", "cuda", "mps") or (isinstance(value, str) and value.startswith("cuda:")):
            return value
        raise KDTuneError(f"{key}: expected auto, cpu, cuda or cuda:N, got {_got(value)}")

    return _described(check, "auto, cpu, cuda, cuda:N or null", ["gpu"])
