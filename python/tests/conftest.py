"""The pytest fixture: a real bridge server, `mix dspex.grpc --port 0 --control`,
started once per session on a free loopback port and stopped at the end."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))


class Server:
    """The running server and its control channel (stdin/stdout lines)."""

    def __init__(self, extra_args=()):
        env = dict(os.environ, MIX_ENV=os.environ.get("DSPEX_TEST_MIX_ENV", "test"))
        self.proc = subprocess.Popen(
            ["mix", "dspex.grpc", "--port", "0", "--ip", "127.0.0.1", "--control", *extra_args],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()
        self.port = None
        self._stderr = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        for line in self.proc.stdout:
            if line.startswith("dspex_bridge grpc listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                break
        if self.port is None:
            raise RuntimeError("the server did not start:\n" + "".join(self._stderr[-50:]))
        self.address = f"127.0.0.1:{self.port}"

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    def command(self, *words) -> str:
        with self._lock:
            self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("the server went away")
                if line.startswith("dspex_bridge reply "):
                    return line[len("dspex_bridge reply "):].strip()

    def token(self, principal="session", sessions="*", ttl_ms=3_600_000) -> str:
        token = self.command("token", principal, sessions, ttl_ms)
        assert token.startswith("dspex_"), token
        return token

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def owner_token(server):
    """A token acting as whichever session a call names."""
    return server.token("session", "*")


@pytest.fixture
def sid():
    return f"py-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ctx(server, owner_token, sid):
    from dspex_bridge import SessionContext

    c = SessionContext(server.address, sid, token=owner_token)
    yield c
    c.close()
