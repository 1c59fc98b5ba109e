"""One error type for everything the user can get wrong.

The CLI turns a `SecateurError` into a one-line message on stderr and exit code 2,
with no traceback: the message must say what is wrong and what is accepted.
"""


class SecateurError(Exception):
    """Bad input or an unusable state the user can fix (exit code 2 in the CLI)."""
