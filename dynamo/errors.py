"""Errors that reach the user as one line: what is wrong and what to do."""


class UserError(Exception):
    """Bad input or environment. run.py prints the message alone and exits non-zero."""
