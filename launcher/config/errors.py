"""User-facing errors: one clear line (or one line per problem), exit code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, impossible combination).

    The CLI prints `error: <message>` and exits with code 2. Raise it before anything
    is written so a failed command never damages what is already saved.
    """

    exit_code = 2


def count(n: int, noun: str) -> str:
    """`1 problem`, `2 problems`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def listing(head: str, problems: list[str]) -> UserError:
    """One error for several problems: the head line, then each problem on its own indented line."""
    return UserError(head + "\n  " + "\n  ".join(problems))
