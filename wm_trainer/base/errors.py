"""The exception the CLI turns into one line on stderr: bad input a user can fix."""


class UserError(Exception):
    """A problem with the user's input, files or installation; the message says what and where."""
