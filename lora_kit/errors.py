"""The one error type users see: a clear, single-line message; CLIs turn it into exit code 2. And the check of a
user's number (a weight, a strength) that raises it."""

import math


class LoraKitError(ValueError):
    """A bad input (file, model, shape, option): the message names the thing and the problem."""


def flag(name: str) -> str:
    """A config field as the command-line flag that sets it: min_size -> --min-size."""
    return "--" + name.replace("_", "-")


def finite(value, what: str) -> float:
    """`value` as a float, or LoraKitError naming `what` when it is not a finite number (NaN would silently turn
    every output into NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoraKitError(f"{what} {value!r}: not a number") from None
    if not math.isfinite(number):
        raise LoraKitError(f"{what} {value!r}: not a finite number")
    return number
