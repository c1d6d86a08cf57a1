"""Errors users see. Each message names the bad value and what to do about it."""


class DataError(ValueError):
    """The input data cannot be used as given (a pattern that matches nothing, an unknown format)."""


class ConfigError(ValueError):
    """A configuration value is invalid."""
