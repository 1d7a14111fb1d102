"""The one exception type for mistakes a user can fix.

Command lines catch it and print its message as a single line (no traceback) and exit with status 2.
Every message names what is wrong (file, key, value) and how to fix it.
"""


class UserError(Exception):
    """Bad input or an impossible request; the message is shown to the user as it is."""
