"""Errors users see. Each message names the bad value and what to do about it.

ConfigError (an option is invalid) is defined with the configs (models/config.py) and re-exported
here; DataError (the input data cannot be used as given) belongs to the pipeline."""
from ..models.config import ConfigError

__all__ = ["ConfigError", "DataError"]


class DataError(ValueError):
    """The input data cannot be used as given (a pattern that matches nothing, an unknown format)."""
