"""Exception and warning types of the MoLE engine."""

from __future__ import annotations


class MoleError(ValueError):
    """Bad input to the MoLE engine: a LoRA file, a gate file or a configuration.

    Messages are one line and name the offending file, key or argument.
    """


class MoleWarning(UserWarning):
    """Something works but deserves attention (duplicate experts, dense fallback, ...)."""
