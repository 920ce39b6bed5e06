"""`VllmServer` never leaves a server behind: the server runs in its own session, so the parent must stop it."""

import os
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    from vllm_spectralquant import serving

    pid_file = Path(sys.argv[1])
    # A stand-in for `vllm serve`: writes its pid and never becomes healthy.
    serving.vllm_command = lambda: [sys.executable, "-c",
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)", str(pid_file)]

    def terminate_when_started():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` / a job scheduler does to the parent

    threading.Thread(target=terminate_when_started, daemon=True).start()
    with serving.VllmServer(["model"], startup_timeout=120):
        pass
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until reaped; it no longer runs.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigterm_to_the_parent_stops_a_starting_server(tmp_path):
    pid_file = tmp_path / "server.pid"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(pid_file)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr[-2000:]
    server = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server), "the server outlived its parent"
