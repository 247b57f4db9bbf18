"""The one exception type the ``data_prep`` CLI turns into a one-line error and exit code 2."""

from __future__ import annotations


class DataPrepError(Exception):
    """A problem with the user's input (missing source, bad CSV row, occupied output, ...)."""
