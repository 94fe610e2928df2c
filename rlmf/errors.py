"""The project's own exception types, in a module that imports nothing of ours, so every layer can raise them."""


class ConfigError(ValueError):
    """A config that composes but cannot run; the message names the key and what is allowed."""
