"""The package's error types: each message names the file, row, flag or id at fault."""


class STSCError(Exception):
    """Base class of every error stsc_tf raises on purpose."""


class DataError(STSCError, ValueError):
    """Bad raw data, records or split files (names the file and row or id)."""


class ConfigError(STSCError, ValueError):
    """A bad flag or configuration value (names the flag)."""
