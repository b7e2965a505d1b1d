"""The one error type for user mistakes, shared by the library and the ``vqfast`` command.

It lives below both so that library modules (checkpoint reading, the trainer, tokenize) can raise it
without importing the command line: layers point one way, and nothing below the CLI imports it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: an argument out of range, a missing, unreadable or mismatched file.

    The message names the argument or file and says what is wrong; ``vqfast`` prints it as one line
    and exits with status 2. Library callers can catch it as a ValueError.
    """
