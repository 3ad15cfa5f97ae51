"""The one exception type for mistakes a user can fix.

The CLIs catch it once and print its message as a single line with exit code 2;
anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, key or value and what would be valid."""
