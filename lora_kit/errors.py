"""The one error type users see: a clear, single-line message; CLIs turn it into exit code 2."""


class LoraKitError(ValueError):
    """A bad input (file, model, shape, option): the message names the thing and the problem."""
