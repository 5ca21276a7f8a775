"""Modules that share their name with their main function (`lora_kit.schedule`, `lora_kit.train`): importing the
submodule makes the package attribute the module, so the module itself answers the call."""

from __future__ import annotations

import sys
import types


def callable_module(name: str, function: str) -> None:
    """Make module `name` callable as its attribute `function` (looked up at each call: it may load lazily)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function)(*args, **kwargs)

    CallableModule.__doc__ = sys.modules[name].__doc__
    sys.modules[name].__class__ = CallableModule
