"""Error types. Every user-facing failure is an ActdiffError whose message names the file, key or
prompt at fault and says what to do; workflow scripts print it without a traceback."""

from __future__ import annotations


class ActdiffError(Exception):
    """A problem with the user's inputs or environment, explained in the message."""


class ConfigError(ActdiffError):
    """The workflow configuration is malformed (the message names the key)."""


class ModelError(ActdiffError):
    """A model directory, checkpoint or config.json cannot be used (the message names the file)."""


class PromptError(ActdiffError):
    """A prompt sheet is malformed (the message names the file, column or prompt)."""


class DumpError(ActdiffError):
    """An activation dump is missing, corrupted, or does not match the node graph."""


class DiskFullError(ActdiffError):
    """An output could not be written because its disk (or quota) is full; the partial file is removed."""
