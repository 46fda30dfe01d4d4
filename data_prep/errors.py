"""The one exception type a user can cause: the CLI prints its message and exits with code 2."""


class DataPrepError(Exception):
    """Bad input or a bad output folder; the message says what is wrong and what to change."""
