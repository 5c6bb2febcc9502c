"""The one error family of ra. Every error a user can cause or meet is an `RaError`: its message is
shown as one line on stderr and its `exit_code` is the process's (1 runtime, 2 usage). Anything
else that escapes is a bug, shown with a hint to rerun with --debug. Imports nothing."""


class RaError(Exception):
    """An error whose message is meant for the user."""

    exit_code = 1


class UsageError(RaError):
    """Bad arguments or settings, found before any work starts."""

    exit_code = 2


class ConfigError(UsageError):
    """A $RA_HOME/config.toml that cannot be used."""


class DocumentError(RaError):
    """A document that cannot be read or answered about."""


class DocumentTooLong(DocumentError):
    """A document (or conversation) that does not fit what the model can attend to."""


class ModelError(RaError):
    """A model that cannot be found or loaded."""


class StoreError(RaError):
    """A cache entry that is missing, or whose files do not match its manifest."""
