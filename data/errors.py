"""The error of bad user input, in a module of its own so that the light path checks of the stage
scripts (:mod:`data.paths`) raise it without importing the readers."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message says what was wrong and what to do."""
