"""User-facing errors: one line that names the problem and the fix.

Library code raises :class:`UserError` for anything a user can cause (bad
config, missing file, wrong checkpoint). The CLI prints its message on one line
and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import re


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


# Failures of the machine rather than of the code: a full disk, missing
# permissions, device memory. They are user-fixable, so the CLI turns them into
# one line too; anything not recognised here stays a traceback (a bug).
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the disk", "free some space (or point --workdir at a larger disk)"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space or raise the quota"),
    errno.EFBIG: ("a file grew past the size limit (`ulimit -f` or the file system's)",
                  "raise the limit or use a file system that allows large files"),
    errno.EACCES: ("permission denied", "make the path writable for this user or choose another path"),
    errno.EPERM: ("operation not permitted", "make the path writable for this user or choose another path"),
    errno.EROFS: ("the file system is read-only", "choose a path on a writable file system"),
}
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def _causes(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def environment_error(exc: BaseException, doing: str = "") -> UserError | None:
  """A :class:`UserError` for a storage or memory failure anywhere in ``exc``'s chain, else None.

  Orbax and tensorstore report a full disk as ``ValueError(... os_error_code='28')``
  rather than ``OSError``, so the text is searched for the errno as well.
  """
  what = f"{doing} failed: " if doing else ""
  for e in _causes(exc):
    code, where = None, ""
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      code, where = e.errno, f" ({e.filename})" if e.filename else ""
    else:
      match = _ERRNO_IN_TEXT.search(str(e))
      if match and int(match.group(1) or match.group(2)) in _STORAGE_ERRNOS:
        code = int(match.group(1) or match.group(2))
    if code is not None:
      reason, fix = _STORAGE_ERRNOS[code]
      return UserError(f"{what}{reason}{where}.", f"{fix}, then rerun the same command.")
    if "RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e).lower():
      return UserError(f"{what}the accelerator ran out of memory.",
                       "lower --config.train.batch_size (raise train.grad_accum to keep the global batch), "
                       "use --config.model.compute_dtype=bfloat16, or shard with --config.mesh.fsdp.")
  return None
