"""Errors expertsim raises for bad input. Each message names the bad value and the fix."""


class ExpertSimError(ValueError):
    """Base class: a user-facing error (the CLI prints its message, not a traceback)."""


class SpecError(ExpertSimError):
    """A model, hardware or serving spec is invalid or unknown."""


class TraceError(ExpertSimError):
    """A routing trace is malformed or does not match the model."""


class PolicyError(ExpertSimError):
    """A policy name or parameter is invalid."""


class ConfigError(ExpertSimError):
    """A simulation configuration cannot run (cache too small, memory overflow, ...)."""
