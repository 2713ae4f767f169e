"""Channels reconnect soon after the gateway restarts (found by the chaos run,
bench/chaos/run.exs: with grpc's defaults, clients came back ~1 s after a
killed gateway was listening again, in ~0.1 s with these)."""
from __future__ import annotations

import grpc

import dspex_bridge.client as client


def _captured_options(monkeypatch, **kw):
    seen = {}

    def insecure_channel(address, options=None, **_):
        seen["options"] = dict(options or [])
        return grpc.insecure_channel.__wrapped__(address, options=options)

    insecure_channel.__wrapped__ = grpc.insecure_channel
    monkeypatch.setattr(client.grpc, "insecure_channel", insecure_channel)
    client.connect("127.0.0.1:1", **kw).close()
    return seen["options"]


def test_connect_bounds_the_reconnect_backoff(monkeypatch):
    options = _captured_options(monkeypatch)
    # At most the gateway's own restart delay, so a client is never the slow one.
    assert options["grpc.initial_reconnect_backoff_ms"] <= 100
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000

