"""The package's console scripts run as a user runs them: with pipes, or on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"the console script {name} is not installed in {BIN}"
    return str(path)


def run_piped(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``args`` with stdout and stderr pipes (as in ``cmd | tee log``)."""
    return subprocess.run([console_script(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


def run_in_terminal(args: list[str], timeout: float = 900) -> tuple[int, str]:
    """``args`` with stdin, stdout and stderr on a pseudo-terminal (80 columns): (exit code, everything printed)."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="40")
    proc = subprocess.Popen([console_script(args[0]), *args[1:]], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{args} ran past {timeout:.0f}s:\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
