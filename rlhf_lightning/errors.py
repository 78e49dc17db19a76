"""The one exception type for errors a user can cause (bad file, bad row, bad key, missing artifact).

Messages say what went wrong, where, and how to fix it, in one line, so that `train.py` can print
them without a traceback.
"""


class RLHFError(Exception):
    """A problem in the user's input, configuration or artifacts (not a bug in rlhf-lightning)."""


class DataError(RLHFError):
    """A data file or record is missing, unreadable or malformed."""

    def __init__(self, what: str, where: str = "", fix: str = ""):
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts))


class ConfigError(RLHFError, ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""


class ArtifactError(RLHFError):
    """An artifact of an earlier stage is missing or does not match what was recorded."""


class CheckpointError(RLHFError):
    """A model checkpoint (`model.name_or_path`) is missing, incomplete or inconsistent."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(f"{what} — fix: {fix}" if fix else what)


class NumericalError(RLHFError):
    """A loss, reward or KL became NaN or infinite."""


class ResourceError(RLHFError):
    """The run does not fit the machine (out of memory): names the shape and what to lower."""
