"""The one error type users see: a clear, single-line message; CLIs turn it into exit code 2. And the checks of a
user's number (a weight, a strength, a seed) and of a trigger word that every command shares (no torch here, so that
the CLIs' --help stays instant)."""

import math

# the largest seed a user may give (lora-train, lora-generate): torch seeds take 64 bits, and below 2**63 leaves room
# for seed + i of image i (class images, generated images)
SEED_MAX = 2**63 - 1
SEED_RANGE = f"from 0 to 2**63 - 1 ({SEED_MAX})"


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


def word_problem(word: str) -> str | None:
    """What is wrong with a trigger word or token a user gives (lora-ppim --token, lora-train --token and
    --init-token), as 'it must ...', or None: a blank one would caption or train nothing the user could prompt."""
    if not word.strip():
        return "it must not be blank"
    return None
