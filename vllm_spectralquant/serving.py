"""A managed ``vllm serve`` process on 127.0.0.1: start, wait until healthy, read its log, stop.

Used by the demo, ``spectralquant eval`` and the end-to-end tests. Importing this module does not
import vLLM (the server is a separate process).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

KV_CAPACITY_RE = re.compile(r"KV cache size: ([\d,]+) tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """``vllm`` of this Python environment, or the module entry point when the script is missing."""
    script = Path(sys.executable).with_name("vllm")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in this process (main thread, default handler only), so that
    ``with VllmServer(...)`` blocks stop their servers: each runs in its own session, and a parent killed
    by a plain SIGTERM would leave it running (seen: an interrupted ``spectralquant eval``)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)


@dataclass
class ServerOptions:
    model: Path
    kv_cache_dtype: str = "auto"
    artifact: Path | None = None
    dtype: str = "float32"  # CPUs without AVX-512-bf16 run bf16 matmuls ~100x slower
    max_model_len: int = 2048
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    sink_tokens: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        a = [str(self.model), "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--served-model-name", "model"]
        if self.kv_cache_dtype != "auto":
            a += ["--kv-cache-dtype", self.kv_cache_dtype]
            if self.kv_cache_dtype.startswith("spectralquant_"):
                a += ["--attention-backend", "CUSTOM"]
                opts = {}
                if self.artifact is not None:
                    opts["artifact"] = str(self.artifact)
                if self.sink_tokens is not None:
                    opts["sink_tokens"] = self.sink_tokens
                if opts:
                    import json

                    a += ["--additional-config", json.dumps({"spectralquant": opts})]
        if self.max_num_batched_tokens:
            a += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.max_num_seqs:
            a += ["--max-num-seqs", str(self.max_num_seqs)]
        a += ["--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"]
        if self.enforce_eager:
            a += ["--enforce-eager"]
        return a + list(self.extra_args)


def parse_metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the Prometheus samples ``name`` in a /metrics page whose labels include ``labels``
    (e.g. ``finished_reason="abort"``); None when there is none."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.eE+-]+|NaN)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    return total if found else None


class VllmServer:
    """``with VllmServer(opts) as srv: srv.base_url ...`` — the process is stopped on exit.

    ``opts`` is either ServerOptions or the literal arguments after ``vllm serve`` (a list of strings,
    used verbatim but for ``--host 127.0.0.1 --port N``, which are always added).
    """

    def __init__(self, opts: ServerOptions | list[str], *, startup_timeout: float = 600.0, log_path: Path | None = None,
                 env: dict[str, str] | None = None):
        self.opts = opts
        self.env = dict(env or {})
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._stopped = False  # stop() was called: an exit after that is not a death

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        env = dict(os.environ, **self.env)
        if isinstance(self.opts, ServerOptions):
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.opts.kv_cache_gib))
            args = self.opts.args()
        else:
            args = [str(a) for a in self.opts]
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        cmd = vllm_command() + args + ["--host", "127.0.0.1", "--port", str(self.port)]
        exit_on_sigterm()
        with open(self.log_path, "wb") as log:
            # A new session, so stop() can signal the engine core and workers too.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}:\n{self.log_tail()}")
                if self.healthy():
                    return self
                time.sleep(1.0)
        except BaseException:
            # __exit__ does not run when __enter__ raises (Ctrl-C, SIGTERM, a dead server): stop it here.
            self.stop()
            raise
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ensure_alive(self) -> None:
        """Raise with the log tail if the server process has exited (e.g. the engine core died)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}; log {self.log_path}:\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self, timeout: float = 600.0):
        """An OpenAI client for this server; raises with the log tail if the server has died."""
        from openai import OpenAI

        self.ensure_alive()  # a dead server fails here with its log tail, not as "Connection refused"
        return OpenAI(base_url=self.base_url + "/v1", api_key="unused", timeout=timeout)

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """A /metrics sample summed over the label sets that include ``labels``, e.g.
        ``metric("vllm:request_success_total", finished_reason="abort")`` (None when absent)."""
        return parse_metric(self.metrics(), name, **labels)

    def prefix_cache_hits(self) -> float:
        """Prompt tokens served from the prefix cache so far (``vllm:prefix_cache_hits_total``)."""
        hits = self.metric("vllm:prefix_cache_hits_total")
        if hits is None:
            raise RuntimeError(f"{self.base_url}/metrics has no vllm:prefix_cache_hits_total (prefix caching off?)")
        return hits

    def kv_capacity_tokens(self) -> int | None:
        """The KV capacity vLLM logged at startup ("... KV cache size: N tokens")."""
        m = KV_CAPACITY_RE.search(self.log())
        return int(m.group(1).replace(",", "")) if m else None

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped = True
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        died = self.proc is not None and self.proc.poll() is not None and not self._stopped
        self.stop()
        if died:  # keep the evidence: the log path goes to stderr with its tail
            sys.stderr.write(f"vllm serve had exited with code {self.proc.returncode}; log kept at {self.log_path}:\n{self.log_tail()}\n")
        elif self._own_log and exc[0] is None:
            self.log_path.unlink(missing_ok=True)
