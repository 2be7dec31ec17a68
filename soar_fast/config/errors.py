"""The one error type for bad configuration: a one-line message naming the field and the fix."""


class ConfigError(ValueError):
    """Raised for an invalid config value. The message names the field, the value and the fix."""
