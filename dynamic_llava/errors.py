"""The one exception type for bad input: the CLI prints its message and exits with code 2."""


class UserError(ValueError):
    """Input the user can fix (bad path, bad flag value, malformed checkpoint)."""
