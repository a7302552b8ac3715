"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input a user can fix. The CLI prints `rlm-train: error: <message>` and exits 2.

    The message names the file or field at fault and the fix.
    """
