"""Errors a user can act on: each message names the problem and what to do."""


class Gemma4Error(Exception):
    """Base class for every error the CLI reports as a one-line message."""


class ConfigError(Gemma4Error):
    """config.json is missing, malformed, or describes something we do not run."""


class CheckpointError(Gemma4Error):
    """The weight files do not match config.json, or are damaged."""
