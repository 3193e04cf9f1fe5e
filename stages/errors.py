"""The one error type a user sees: every stage raises it, and only the CLI turns it into an exit code."""


class PgolfError(Exception):
    """An error for the user: the message names the file or key at fault and the fix. Exit status 2."""

    exit_code = 2


class Rejected(PgolfError):
    """The stage ran to the end and its verdict is negative (a failed verify check, a blob over the size
    limit); its report is written. Exit status 1, so scripts can tell a rejection from a usage error."""

    exit_code = 1
