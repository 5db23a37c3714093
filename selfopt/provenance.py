"""Where a run or an exported optimizer comes from: the command, the code and the date.

A new run writes ``RUN/provenance.json`` once; ``selfopt export`` copies it into the file it
writes, so a file handed to a colleague says how to make it again.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def commit() -> str | None:
    """The git commit of the selfopt source that runs (``+dirty`` with uncommitted changes to
    it), or ``None`` for an installed copy outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def version() -> str | None:
    """The installed selfopt version, if it is installed."""
    try:
        return importlib.metadata.version("selfopt")
    except importlib.metadata.PackageNotFoundError:
        return None


def now() -> str:
    """The UTC time to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def provenance() -> dict[str, Any]:
    """``{"command", "commit", "version", "date"}`` of this process."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("selfopt", "cli.py", "__main__.py"):
        argv[0] = "selfopt"
    return {"command": shlex.join(argv), "commit": commit(), "version": version(),
            "date": now()}
