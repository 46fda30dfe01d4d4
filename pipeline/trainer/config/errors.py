"""The one error type of a training config."""


class ConfigError(Exception):
    """A training config the pipeline cannot run; the message names the key and what to change."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
