"""Servers as child processes of a job: free ports, the run's API key, and stopping what was started.

Used by every server a job starts (vLLM for a generation shard, the reward model for a service):
a port found free by a real bind, an API key file readable by its owner only, a process in a
session of its own that the kernel stops if the job dies (parent-death signal), and its whole
process group stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from filelock import FileLock

LOG_TAIL_LINES = 25
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server did not start, or exited while the shard still needed it."""


def run_api_key(path: Path) -> str:
    """The run's API key: made once, readable by its owner only; every later shard reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()


def node_address() -> str:
    """The address other nodes reach this one at: its host name's."""
    return socket.gethostbyname(socket.gethostname())


def free_port(host: str) -> int:
    """A port that a real bind on ``host`` just got from the kernel."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesized command: state, ppid, pgrp, ...
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


# Loaded here, not in the forked child: loading a library between fork and exec can deadlock.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the server process before exec: the kernel sends it SIGTERM if the job dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Passed as ``preexec_fn``: it only calls prctl through the library loaded above, so no lock is
# taken between fork and exec.
DIE_WITH_PARENT = _die_with_parent if _LIBC else None
