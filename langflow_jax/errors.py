"""User-facing errors: one line that names the problem and the fix.

Library code raises :class:`UserError` for anything a user can cause (bad
config, missing file, wrong checkpoint). The CLI prints its message on one line
and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
  """A mistake the user can fix; the message says what and how."""

  def __init__(self, problem: str, fix: str | None = None):
    self.problem = problem
    self.fix = fix
    super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class ConfigError(UserError):
  """An invalid configuration value or key."""


class DataError(UserError):
  """A corpus, tokenizer or dataset that cannot be used."""


class CheckpointError(UserError):
  """A missing, corrupted or mismatched checkpoint."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or Inf loss."""
