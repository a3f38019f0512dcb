"""User-facing errors: one clear line (or one line per problem), exit code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, impossible combination).

    The CLI prints `error: <message>` and exits with code 2. Raise it before anything
    is written so a failed command never damages what is already saved.
    """

    exit_code = 2
