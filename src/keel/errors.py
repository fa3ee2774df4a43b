"""Error types: every user mistake is a KeelError whose message is one line naming what and how to fix."""

EXIT_REFUSED = 2  # the exit code of a process that stopped on a KeelError


class KeelError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits with code 2."""


class ConfigError(KeelError):
    """A bad config file, key, value or command-line option."""


class DataError(KeelError):
    """A bad, missing or inconsistent data file, dataset or manifest."""


class CheckpointError(KeelError):
    """A missing, uncommitted, corrupt or incompatible checkpoint."""


class LaunchError(KeelError):
    """A launch or environment problem: processes, devices, process groups."""
