"""The one exception type for problems a user can fix."""


class UserError(ValueError):
    """A problem with the user's options, data, model or output folder. ``dpo-fast`` prints its
    message (one line, naming the flag, file or field) and exits with status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
