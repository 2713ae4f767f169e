"""The gRPC bridge against its floor, side by side in one run.

The floor is a minimal Python grpcio server answering GetVariable and
SetVariable from a dict (its own process). Cases: GetVariable and
SetVariable round trip p50 with one client; GetVariable throughput with 4
client processes; WatchVariables latency (an Elixir write to Python receipt)
p50/p99. Targets: <= 1.5x the floor per call, >= 0.7x its throughput.

    MIX_ENV=prod .venv/bin/python bench/grpc_bench.py
"""
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from concurrent import futures

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))

import grpc  # noqa: E402

from dspex_bridge._generate import generate  # noqa: E402

generate()
from dspex_bridge import values  # noqa: E402
from dspex_bridge._proto import bridge_service_pb2 as pb  # noqa: E402
from dspex_bridge._proto import bridge_service_pb2_grpc as pb_grpc  # noqa: E402

CALLS = int(os.environ.get("BENCH_CALLS", "3000"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))


class Floor(pb_grpc.BridgeServiceServicer):
    def __init__(self):
        self.vars = {}
        self.lock = threading.Lock()

    def GetVariable(self, req, context):
        with self.lock:
            version, value = self.vars.get(req.variable_identifier, (0, 0.5))
        any_value, _ = values.encode("float", value)
        return pb.GetVariableResponse(variable=pb.Variable(
            id="var_x_1", name=req.variable_identifier, type="float", value=any_value,
            version=version))

    def SetVariable(self, req, context):
        value = values.decode(req.value)
        with self.lock:
            version = self.vars.get(req.variable_identifier, (0, None))[0] + 1
            self.vars[req.variable_identifier] = (version, value)
        return pb.SetVariableResponse(success=True, new_version=version)


def run_floor(q):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_BridgeServiceServicer_to_server(Floor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    q.put(port)
    server.wait_for_termination()


def p(values_, q):
    s = sorted(values_)
    return s[min(len(s) - 1, int(q * len(s)))]


def round_trips(address, md, sid):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.BridgeServiceStub(channel)
    get = pb.GetVariableRequest(session_id=sid, variable_identifier="x")
    out = {}
    for name, call, make in [
        ("GetVariable", stub.GetVariable, lambda i: get),
        ("SetVariable", stub.SetVariable,
         lambda i: pb.SetVariableRequest(session_id=sid, variable_identifier="x",
                                         value=values.encode("float", (i % 100) / 100)[0])),
    ]:
        for i in range(200):
            call(make(i), metadata=md)
        times = []
        for i in range(CALLS):
            req = make(i)
            t0 = time.perf_counter_ns()
            call(req, metadata=md)
            times.append((time.perf_counter_ns() - t0) / 1000)
        out[name] = statistics.median(times)
    channel.close()
    return out


def hammer(address, md, sid, seconds, q):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.BridgeServiceStub(channel)
    req = pb.GetVariableRequest(session_id=sid, variable_identifier="x")
    for _ in range(100):
        stub.GetVariable(req, metadata=md)
    n = 0
    end = time.time() + seconds
    while time.time() < end:
        stub.GetVariable(req, metadata=md)
        n += 1
    q.put(n / seconds)


def throughput(address, md, sid):
    q = mp.Queue()
    procs = [mp.Process(target=hammer, args=(address, md, sid, SECONDS, q)) for _ in range(4)]
    for pr in procs:
        pr.start()
    rates = [q.get() for _ in procs]
    for pr in procs:
        pr.join()
    return sum(rates)


def watch_latency(server, token, sid, n=300):
    from dspex_bridge import SessionContext

    import queue

    ctx = SessionContext(server.address, sid, token=token)
    updates = queue.Queue()

    def consume():
        try:
            for u in ctx.watch_variables(["x"]):
                updates.put(u.value)
        except Exception as err:  # the stream ended: the waits below time out
            updates.put(err)

    threading.Thread(target=consume, daemon=True).start()

    def wait_for(value, timeout):
        deadline = time.monotonic() + timeout
        while True:
            got = updates.get(timeout=max(deadline - time.monotonic(), 0.001))
            if got == value:
                return

    # The stream is registered on the server some time after the call
    # starts: write until a write is seen, so no measured write is missed.
    for attempt in range(100):
        assert server.command("set", sid, "x", f"{attempt}.5") == "ok"
        try:
            wait_for(attempt + 0.5, 0.1)
            break
        except queue.Empty:
            continue
    lat = []
    for i in range(n):
        value = 1000 + i
        t0 = time.perf_counter_ns()
        assert server.command("set", sid, "x", f"{value}.0") == "ok"
        wait_for(float(value), 10)
        lat.append((time.perf_counter_ns() - t0) / 1000)
    ctx.close()
    return statistics.median(lat), p(lat, 0.99)


def main():
    from conftest import Server

    os.environ.setdefault("DSPEX_TEST_MIX_ENV", os.environ.get("MIX_ENV", "prod"))
    server = Server()
    token = server.token("session", "*")
    md = [("authorization", f"Bearer {token}")]
    sid = "bench-grpc"
    from dspex_bridge import SessionContext

    ctx = SessionContext(server.address, sid, token=token)
    ctx.register_variable("x", "float", 0.5)
    ctx.close()

    q = mp.Queue()
    floor_proc = mp.Process(target=run_floor, args=(q,), daemon=True)
    floor_proc.start()
    floor_address = f"127.0.0.1:{q.get()}"

    results = {}
    ours = round_trips(server.address, md, sid)
    floor = round_trips(floor_address, md, sid)
    for name in ("GetVariable", "SetVariable"):
        results[name] = {"bridge_p50_us": round(ours[name], 1),
                         "floor_p50_us": round(floor[name], 1),
                         "ratio": round(ours[name] / floor[name], 2), "target": "<= 1.5"}
    t_ours = throughput(server.address, md, sid)
    t_floor = throughput(floor_address, md, sid)
    results["throughput_4_clients"] = {"bridge_ops_s": round(t_ours), "floor_ops_s": round(t_floor),
                                       "ratio": round(t_ours / t_floor, 2), "target": ">= 0.7"}
    print(json.dumps(results), file=sys.stderr, flush=True)
    p50, p99 = watch_latency(server, token, sid)
    results["WatchVariables_latency"] = {"p50_us": round(p50, 1), "p99_us": round(p99, 1),
                                         "note": "Elixir write (via the control pipe) to Python receipt"}
    floor_proc.terminate()
    server.stop()
    print(json.dumps(results, indent=2))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "grpc_bench.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
