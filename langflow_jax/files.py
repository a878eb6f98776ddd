"""Files written whole or not at all."""

from __future__ import annotations

import os
import pathlib


def write_atomic(path: str | pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file beside it and a rename, so that a
  reader, or a run killed halfway, never sees half a file (the temporary is per process)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)
