"""WatchVariables: initial values, version order, coalescing, ends."""
import os
import signal
import threading
import time

import grpc
import pytest

from dspex_bridge import AuthenticationError, SessionContext, UnavailableError


def test_initial_values_and_updates_in_order(server, ctx, sid):
    ctx.register_variable("w", "integer", 0)
    watch = ctx.watch_variables(["w"], include_initial_values=True)
    it = iter(watch)
    first = next(it)
    assert (first.name, first.value, first.version, first.update_type) == ("w", 0, 0, "initial_value")
    for n in range(1, 6):
        assert server.command("set", sid, "w", n) == "ok"
    seen = []
    while not seen or seen[-1] < 5:
        u = next(it)
        assert u.update_type == "value_change"
        seen.append(u.version)
    assert seen == sorted(seen) and seen[-1] == 5
    # The watch keeps the read cache coherent.
    assert ctx.get_variable("w") == 5
    watch.cancel()


def test_slow_consumer_is_coalesced(server, ctx, sid):
    ctx.register_variable("fast", "integer", 0)
    watch = ctx.watch_variables(["fast"])
    it = iter(watch)
    total = 400
    for n in range(1, total + 1):
        ctx.update_variable("fast", n)
    versions = []
    while not versions or versions[-1] < total:
        versions.append(next(it).version)
    assert versions == sorted(set(versions))
    assert versions[-1] == total
    watch.cancel()


def test_deleting_the_session_ends_the_stream(server, ctx, sid):
    ctx.register_variable("d", "integer", 0)
    watch = ctx.watch_variables(["d"], include_initial_values=True)
    it = iter(watch)
    next(it)
    assert server.command("delete_session", sid) == "ok"
    assert list(it) == []  # ends cleanly (OK status)


def test_deleting_the_variable_is_an_update(server, ctx):
    ctx.register_variable("gone", "integer", 0)
    ctx.register_variable("stays", "integer", 0)
    it = iter(ctx.watch_variables(["gone", "stays"], include_initial_values=True))
    # The initial values show the watch is in place before the delete.
    assert {next(it).name, next(it).name} == {"gone", "stays"}
    ctx.delete_variable("gone")
    u = next(it)
    assert (u.name, u.update_type, u.value) == ("gone", "deleted", None)


def test_revoking_the_token_ends_the_stream(server, sid):
    token = server.token(sid, sid)
    ctx = SessionContext(server.address, sid, token=token)
    ctx.register_variable("r", "integer", 0)
    it = iter(ctx.watch_variables(["r"], include_initial_values=True))
    next(it)
    server.command("revoke", token)
    with pytest.raises(AuthenticationError):
        next(it)


def test_watch_needs_observe(server, ctx, sid):
    ctx.register_variable("private", "integer", 0)
    worker = SessionContext(server.address, sid, token=server.token("worker-9", sid), create=False)
    with pytest.raises(Exception) as e:
        next(iter(worker.watch_variables(["private"])))
    assert "access_denied" in str(e.value)
    ctx.set_variable_permissions("private", [{"session_pattern": "worker-*",
                                              "permissions": ["observe"]}])
    it = iter(worker.watch_variables(["private"], include_initial_values=True))
    assert next(it).value == 0


def test_kill_the_gateway_mid_traffic(server, owner_token, sid):
    """kill -9 of the gateway: calls in flight get UNAVAILABLE, clients
    reconnect, and no acknowledged write is lost."""
    ctx = SessionContext(server.address, sid, token=owner_token)
    ctx.register_variable("acked", "integer", 0)
    acked = []
    errors = []
    stop = threading.Event()

    def writer():
        c = SessionContext(server.address, sid, token=owner_token, create=False, timeout=5)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                v = c.update_variable("acked", n)
                acked.append((v, n))
            except UnavailableError:
                errors.append(n)
                time.sleep(0.01)
        c.close()

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 20:
        time.sleep(0.01)
    pid = int(server.command("os_pid"))
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        new_pid = server.command("os_pid")
        if new_pid and new_pid != str(pid) and errors and len(acked) > 0 and acked[-1][1] > errors[-1]:
            break
        time.sleep(0.05)
    stop.set()
    t.join()
    assert errors, "the kill was not seen by any call"
    assert acked[-1][1] > errors[-1], "the client did not reconnect"
    history = {e["version"]: e["value"] for e in ctx.get_variable_history("acked", 1000)}
    current = ctx.get_variable_info("acked")
    history[current["version"]] = current["value"]
    # Versions only go up, each acknowledged write is at the version it was
    # acknowledged with (as far back as the bounded history reaches), and
    # nothing acknowledged is behind the current version.
    versions = [v for v, _ in acked]
    assert versions == sorted(set(versions))
    assert current["version"] >= versions[-1]
    oldest = min(history)
    checked = [(v, n) for v, n in acked if v >= oldest]
    assert checked
    for version, value in checked:
        assert history.get(version) == value, (version, value)
    ctx.close()
