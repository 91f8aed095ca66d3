"""The failures a trainer reports as one line (``pipeline.errors.run_cli`` prints them)."""

from __future__ import annotations

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A problem with the configuration or its inputs found at start; the message names the flag."""


class CheckpointError(UserError, ValueError):
    """A file that cannot be used as a checkpoint (missing, truncated, not ours, or holding
    non-tensor objects); the message names the file."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was written before raising."""


class DataStreamError(UserError):
    """The data stream failed mid-run (a missing shard, a read error that retries did not cure);
    a checkpoint of the last completed step was written before raising."""
