"""Tokens, bad input, garbage on the socket, limits, TLS."""
import os
import socket
import subprocess
import time

import grpc
import pytest

from dspex_bridge import AuthenticationError, AccessDeniedError, SessionContext
from dspex_bridge._proto import bridge_service_pb2 as pb
from dspex_bridge._proto import bridge_service_pb2_grpc as pb_grpc
from dspex_bridge import values


def stub_for(server):
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.BridgeServiceStub(channel)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_missing_bad_expired_revoked_tokens(server, sid):
    channel, stub = stub_for(server)
    ping = pb.PingRequest(message="x")
    assert code_of(lambda: stub.Ping(ping)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.Ping(ping, metadata=[("authorization", "Bearer nope")])) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.Ping(ping, metadata=[("authorization", "Basic abc")])) \
        == grpc.StatusCode.UNAUTHENTICATED
    expired = server.token("session", "*", 1)
    time.sleep(0.01)
    assert code_of(lambda: stub.Ping(ping, metadata=[("authorization", f"Bearer {expired}")])) \
        == grpc.StatusCode.UNAUTHENTICATED
    token = server.token("session", "*")
    md = [("authorization", f"Bearer {token}")]
    assert stub.Ping(ping, metadata=md).message == "pong: x"
    assert server.command("revoke", token) == "ok"
    assert code_of(lambda: stub.Ping(ping, metadata=md)) == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    with pytest.raises(AuthenticationError):
        SessionContext(server.address, sid, token=expired)


def test_token_limited_to_its_sessions(server, sid):
    token = server.token("session", "py-other-*")
    with pytest.raises(AccessDeniedError):
        SessionContext(server.address, sid, token=token)
    ok = SessionContext(server.address, "py-other-1", token=token)
    assert ok.heartbeat()
    ok.cleanup()


def test_garbage_protobufs_get_invalid_argument(server, owner_token):
    channel = grpc.insecure_channel(server.address)
    md = [("authorization", f"Bearer {owner_token}")]
    for method in ("GetVariable", "SetVariable", "WatchVariables"):
        for payload in (b"\xff\xff\xff\xff", b"\x0a\x10short", b"\x12"):
            if method == "WatchVariables":
                call = channel.unary_stream(f"/snakepit.bridge.BridgeService/{method}")
                fn = lambda: list(call(payload, metadata=md))
            else:
                call = channel.unary_unary(f"/snakepit.bridge.BridgeService/{method}")
                fn = lambda: call(payload, metadata=md)
            assert code_of(fn) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = channel.unary_unary("/snakepit.bridge.BridgeService/Nope")
    assert code_of(lambda: unknown(b"", metadata=md)) == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_wrong_types_huge_values_and_bad_fields(server, owner_token, ctx, sid):
    ctx.register_variable("x", "integer", 1)
    channel, stub = stub_for(server)
    md = [("authorization", f"Bearer {owner_token}")]
    # A float value for an integer variable, a string for a float, bad JSON.
    for any_value in (values.encode("float", 1.5)[0], values.encode("string", "no")[0],
                      values.any_pb2.Any(type_url="type.googleapis.com/snakepit.integer",
                                         value=b"{not json"),
                      values.any_pb2.Any(type_url="bogus", value=b"1")):
        r = stub.SetVariable(pb.SetVariableRequest(session_id=sid, variable_identifier="x",
                                                   value=any_value), metadata=md)
        assert r.success is False and r.error_message.split(":")[0] in (
            "invalid_value", "constraint_violation", "invalid_argument")
    r = stub.RegisterVariable(pb.RegisterVariableRequest(session_id=sid, name="y", type="weird",
                                                         initial_value=values.encode("integer", 1)[0]),
                              metadata=md)
    assert r.success is False and "unknown_type" in r.error_message
    r = stub.RegisterVariable(pb.RegisterVariableRequest(session_id=sid, name="y", type="integer",
                                                         constraints_json="{broken",
                                                         initial_value=values.encode("integer", 1)[0]),
                              metadata=md)
    assert r.success is False and "invalid_json" in r.error_message
    # Over the engine's 1 MiB value limit (but under the 4 MiB message limit).
    big = values.any_pb2.Any(type_url="type.googleapis.com/snakepit.string",
                             value=('"' + "a" * (2 << 20) + '"').encode())
    r = stub.RegisterVariable(pb.RegisterVariableRequest(session_id=sid, name="big", type="string",
                                                         initial_value=big), metadata=md)
    assert r.success is False and "too_large" in r.error_message
    # Over the message limit: refused by the gateway.
    huge = values.any_pb2.Any(type_url="type.googleapis.com/snakepit.string",
                              value=b'"' + b"a" * (5 << 20) + b'"')
    assert code_of(lambda: stub.SetVariable(pb.SetVariableRequest(
        session_id=sid, variable_identifier="x", value=huge), metadata=md)) \
        in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE)
    # Deeply nested JSON is refused, not recursed into.
    deep = values.any_pb2.Any(type_url="type.googleapis.com/snakepit.tensor",
                              value=b"[" * 5000 + b"]" * 5000)
    r = stub.SetVariable(pb.SetVariableRequest(session_id=sid, variable_identifier="x",
                                               value=deep), metadata=md)
    assert r.success is False
    assert code_of(lambda: stub.GetVariable(pb.GetVariableRequest(session_id="",
                                                                  variable_identifier="x"),
                                            metadata=md)) == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.get_variable("x") == 1
    channel.close()


def test_garbage_bytes_on_the_socket_never_hurt(server, ctx):
    ctx.register_variable("alive", "integer", 7)
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x00\x01\x00\x00\x00\x01garbage"]
    for p in payloads:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(p)
        s.settimeout(2)
        try:
            s.recv(1024)
        except OSError:
            pass
        s.close()
    # Half a frame, then the connection dropped.
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x40\x04")
    s.close()
    assert ctx.get_variable("alive") == 7


def test_traceparent_is_accepted(ctx):
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx.with_traceparent(tp)
    ctx.register_variable("traced", "integer", 1)
    assert ctx.update_variable("traced", 2) == 1
    ctx.with_traceparent("garbage")
    assert ctx.update_variable("traced", 3) == 2


def _openssl():
    from shutil import which
    return which("openssl")


@pytest.mark.skipif(_openssl() is None, reason="needs the openssl CLI to make a certificate")
def test_tls(tmp_path):
    from conftest import Server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([_openssl(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = Server(["--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        token = srv.token("session", "*")
        ctx = SessionContext(srv.address, "py-tls", token=token, root_certificates=cert.read_bytes())
        ctx.register_variable("x", "integer", 1)
        assert ctx.get_variable("x") == 1
        ctx.close()
        # Plaintext against the TLS port fails; so does TLS without trusting the cert.
        plain = SessionContext(srv.address, "py-tls", token=token, create=False, timeout=3)
        with pytest.raises(Exception):
            plain.get_variable("x")
        plain.close()
    finally:
        srv.stop()
