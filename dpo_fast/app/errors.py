"""The one exception type for problems a user can fix."""


class UserError(ValueError):
    """A problem with the user's options, data, model or output folder. ``dpo-fast`` prints its
    message (one line, naming the flag, file or field) and exits with status 2."""
