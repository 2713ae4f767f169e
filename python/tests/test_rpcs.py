"""Every RPC of BridgeService against the real server, with each error
convention of the wire contract."""
import json
import threading

import grpc
import pytest

from dspex_bridge import (AccessDeniedError, AuthenticationError, BatchError, CycleError,
                          InvalidValueError, LockedError, SessionContext, VariableNotFoundError,
                          VersionMismatchError)
from dspex_bridge._proto import bridge_service_pb2 as pb
from dspex_bridge._proto import bridge_service_pb2_grpc as pb_grpc
from dspex_bridge import values


def raw(server, token):
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.BridgeServiceStub(channel), [("authorization", f"Bearer {token}")]


def test_session_rpcs(ctx, sid):
    assert ctx.ping("hi") == "pong: hi"
    assert ctx.heartbeat() is True
    ctx.register_variable("a", "integer", 1)
    info = ctx.get_session()
    assert info["session_id"] == sid and info["variable_count"] == 1
    assert ctx.initialize() == {"a": 1}
    assert ctx.cleanup() == 1
    assert ctx.heartbeat() is False


def test_unknown_session_is_not_found(server, owner_token):
    ctx = SessionContext(server.address, "py-never-created", token=owner_token, create=False)
    channel, stub, md = raw(server, owner_token)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetVariable(pb.GetVariableRequest(session_id="py-never-created",
                                               variable_identifier="x"), metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in e.value.details()
    r = stub.SetVariable(pb.SetVariableRequest(session_id="py-never-created",
                                               variable_identifier="x",
                                               value=values.encode("integer", 1)[0]),
                         metadata=md)
    assert r.success is False and r.error_message.startswith("session_not_found")
    with pytest.raises(Exception):
        ctx.get_variable("x")
    channel.close()


def test_get_variable_unknown_is_not_found_with_words(server, owner_token, ctx, sid):
    channel, stub, md = raw(server, owner_token)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="ghost"),
                         metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in e.value.details()
    channel.close()


def test_variables_crud_and_types(ctx):
    ctx.register_variable("f", "float", 1)
    assert ctx.get_variable("f") == 1.0
    ctx.register_variable("s", "string", "x", constraints={"max_length": 3})
    ctx.register_variable("b", "boolean", True)
    ctx.register_variable("c", "choice", "a", constraints={"choices": ["a", "b"]})
    ctx.register_variable("e", "embedding", [0.1, 0.2])
    ctx.register_variable("t", "tensor", {"shape": [2, 2], "data": [1, 2, 3, 4]})
    assert ctx.get_variable("t") == {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
    with pytest.raises(InvalidValueError):
        ctx.update_variable("s", "toolong")
    with pytest.raises(InvalidValueError):
        ctx.update_variable("c", "z")
    with pytest.raises(InvalidValueError):
        ctx.update_variable("b", "not a bool")
    names = [v["name"] for v in ctx.list_variables()]
    assert names == sorted(["f", "s", "b", "c", "e", "t"])
    assert [v["name"] for v in ctx.list_variables("f*")] == ["f"]
    info = ctx.get_variable_info("s")
    assert info["constraints"] == {"max_length": 3} and info["version"] == 0
    ctx.delete_variable("f")
    assert "f" not in ctx
    with pytest.raises(VariableNotFoundError):
        ctx.delete_variable("f")


def test_batch_get_and_set(ctx):
    ctx.register_variable("x", "integer", 1)
    ctx.register_variable("y", "integer", 2)
    assert ctx.get_variables(["x", "y", "nope"]) == {"x": 1, "y": 2}
    assert ctx.update_variables({"x": 10, "y": 20}, atomic=True) == {"x": 1, "y": 1}
    with pytest.raises(BatchError) as e:
        ctx.update_variables({"x": 11, "y": "bad"}, atomic=True)
    assert e.value.atomic and set(e.value.errors) == {"y"} and e.value.new_versions == {}
    assert ctx.get_variables(["x", "y"]) == {"x": 10, "y": 20}


def test_non_atomic_batch_partial(server, owner_token, ctx, sid):
    ctx.register_variable("x", "integer", 1)
    channel, stub, md = raw(server, owner_token)
    req = pb.BatchSetVariablesRequest(session_id=sid, atomic=False)
    req.updates["x"].CopyFrom(values.encode("integer", 5)[0])
    req.updates["ghost"].CopyFrom(values.encode("integer", 5)[0])
    r = stub.SetVariables(req, metadata=md)
    assert r.success is True
    assert "ghost" in r.errors and dict(r.new_versions) == {"x": 1}
    assert ctx.get_variable("x") == 5
    channel.close()


def test_batch_context_manager_and_dict_access(ctx):
    ctx.register_variable("p", "float", 0.1)
    ctx.register_variable("q", "float", 0.2)
    with ctx.batch() as b:
        b["p"] = 0.5
        b["q"] = 0.6
    assert ctx["p"] == 0.5 and ctx["q"] == 0.6
    ctx.v.p = 0.7
    assert ctx.v.p == 0.7
    with pytest.raises(AttributeError):
        ctx.v.nothing


def test_history_and_rollback(ctx):
    ctx.register_variable("h", "integer", 0)
    for n in (1, 2, 3):
        ctx.update_variable("h", n)
    hist = ctx.get_variable_history("h")
    assert [e["version"] for e in hist] == [2, 1, 0]
    assert [e["value"] for e in hist] == [2, 1, 0]
    assert ctx.rollback_variable("h", 1) == 4
    assert ctx.get_variable("h") == 1
    with pytest.raises(Exception) as e:
        ctx.rollback_variable("h", 99)
    assert "version_not_found" in str(e.value)


def test_dependencies(ctx):
    for n in ("a", "b", "c"):
        ctx.register_variable(n, "integer", 0)
    ctx.add_dependency("a", "b")
    ctx.add_dependency("b", "c")
    assert ctx.get_dependencies("c") == ["b"]
    assert ctx.get_dependencies("c", transitive=True) == ["a", "b"]
    assert ctx.get_dependents("a", transitive=True) == ["b", "c"]
    with pytest.raises(CycleError):
        ctx.add_dependency("c", "a")
    with pytest.raises(CycleError):
        ctx.add_dependency("a", "a")


def test_optimization_lock(server, owner_token, ctx, sid):
    ctx.register_variable("lr", "float", 0.1)
    opt = ctx.start_optimization("lr", optimizer_id="py-opt")
    assert opt.optimizer_id == "py-opt" and opt.lock_token > 0
    status = ctx.get_optimization_status("lr")
    assert status["optimizing"] and status["optimizer_id"] == "py-opt"
    # Another client (no lock token) is refused; the holder writes.
    other = SessionContext(server.address, sid, token=owner_token)
    with pytest.raises(LockedError):
        other.update_variable("lr", 0.3)
    with pytest.raises(LockedError):
        other.start_optimization("lr")
    assert ctx.update_variable("lr", 0.2) == 1
    assert ctx.stop_optimization("lr") == 0.2
    assert ctx.get_optimization_status("lr")["optimizing"] is False
    assert other.update_variable("lr", 0.3) == 2
    other.close()


def test_permissions_and_principals(server, ctx, sid):
    ctx.register_variable("secret", "integer", 1)
    ctx.register_variable("shared", "integer", 2)
    ctx.set_variable_permissions("shared", [{"session_pattern": "worker-*",
                                             "permissions": ["read"]}])
    assert ctx.check_variable_access("shared", "read", principal="worker-1") is True
    assert ctx.check_variable_access("shared", "write", principal="worker-1") is False
    assert ctx.check_variable_access("secret", "read", principal="worker-1") is False
    with pytest.raises(InvalidValueError):
        ctx.check_variable_access("shared", "fly", principal="worker-1")
    # A worker's own token: reads what it was granted, nothing else.
    token = server.token("worker-1", sid)
    worker = SessionContext(server.address, sid, token=token, create=False)
    assert worker.get_variable("shared") == 2
    with pytest.raises(AccessDeniedError):
        worker.get_variable("secret")
    with pytest.raises(AccessDeniedError):
        worker.update_variable("shared", 3)
    with pytest.raises(AccessDeniedError):
        worker.set_variable_permissions("shared", [])
    assert [v["name"] for v in worker.list_variables()] == ["shared"]
    worker.close()


def test_tools_are_unimplemented(server, owner_token, sid):
    channel, stub, md = raw(server, owner_token)
    with pytest.raises(grpc.RpcError) as e:
        stub.ExecuteTool(pb.ExecuteToolRequest(session_id=sid, tool_name="x"), metadata=md)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ExecuteStreamingTool(pb.ExecuteToolRequest(session_id=sid), metadata=md))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for call, req in [(stub.RegisterTools, pb.RegisterToolsRequest()),
                      (stub.GetExposedElixirTools, pb.GetExposedElixirToolsRequest()),
                      (stub.ExecuteElixirTool, pb.ExecuteElixirToolRequest())]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_binary_embeddings_round_trip(ctx):
    emb = [i / 7 for i in range(1000)]
    ctx.register_variable("emb", "embedding", emb)
    assert ctx.get_variable("emb") == emb
    t = {"shape": [10, 10], "data": [float(i) for i in range(100)]}
    ctx.register_variable("t", "tensor", t)
    assert ctx.get_variable("t") == t
    ctx.update_variable("emb", [1.5] * 1000)
    assert ctx.get_variable("emb") == [1.5] * 1000


def test_json_only_clients_get_json(server, owner_token, ctx, sid):
    """An existing client (no x-dspex-binary) always gets JSON values."""
    ctx.register_variable("emb", "embedding", [0.25] * 100)
    channel, stub, md = raw(server, owner_token)
    r = stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="emb"),
                         metadata=md)
    assert r.variable.value.type_url == "type.googleapis.com/snakepit.embedding"
    assert json.loads(r.variable.value.value) == [0.25] * 100
    assert r.variable.binary_value == b""
    channel.close()


def test_pickled_binary_values_are_refused(server, owner_token, ctx, sid):
    import pickle

    ctx.register_variable("emb", "embedding", [0.0, 0.0])
    channel, stub, md = raw(server, owner_token)
    any_value = values.any_pb2.Any(type_url="type.googleapis.com/snakepit.embedding.binary",
                                   value=json.dumps({"shape": [2], "dtype": "float64"}).encode())
    r = stub.SetVariable(pb.SetVariableRequest(session_id=sid, variable_identifier="emb",
                                               value=any_value,
                                               binary_value=pickle.dumps([1.0, 2.0])),
                         metadata=md)
    assert r.success is False and "pickle" in r.error_message
    assert ctx.get_variable("emb") == [0.0, 0.0]
    channel.close()


def test_racing_expected_version_one_winner_per_version(server, owner_token, sid):
    ctx = SessionContext(server.address, sid, token=owner_token)
    ctx.register_variable("counter", "integer", 0)
    rounds = 15
    wins = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n):
        c = SessionContext(server.address, sid, token=owner_token, create=False)
        for _ in range(rounds):
            barrier.wait()
            info = c.get_variable_info("counter")
            try:
                v = c.update_variable("counter", info["value"] + 1,
                                      expected_version=info["version"])
                with lock:
                    wins.setdefault(v, []).append(n)
            except VersionMismatchError as e:
                assert e.current_version is not None and e.current_version > info["version"]
            barrier.wait()
        c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(w) == 1 for w in wins.values()), wins
    final = ctx.get_variable_info("counter")
    assert final["value"] == len(wins) == final["version"]
    assert sorted(wins) == list(range(1, final["version"] + 1))
    ctx.close()
