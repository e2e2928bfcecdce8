"""The one exception type users see: a message that says what was wrong and what to do."""


class FeatcacheError(Exception):
    """Bad input or state the user can fix. The CLI prints it as one line and exits non-zero."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")
