"""The load driver's gRPC path: Python clients over gRPC, open loop.

Started by ``mix run bench/load/run.exs --path grpc`` (which starts the
gateway, creates the sessions and samples the server's memory and queues);
it can also be run by hand against ``mix dspex.grpc``:

    .venv/bin/python bench/load/grpc_load.py --address 127.0.0.1:50051 \\
        --token T --sessions s1,s2,... --segments '[[0,60000,5000.0,5000.0]]'

``--procs`` client processes (multiprocessing), each owning its share of the
sessions outright (so it knows what every variable must hold) and running
an asyncio event loop with grpc.aio over ``--channels`` HTTP/2 connections.
Arrivals are released on 1 ms ticks at the profile's rate (``--segments``:
``[from_ms, to_ms, rate_from, rate_to]``, ops/s over all processes); a
session has one call outstanding, later arrivals for it wait in its queue,
latency is measured from the intended start (no coordinated omission), and
arrivals older than ``--timeout`` are not sent and count as unanswered.

The mix is the Elixir driver's: 70% GetVariable, 20% SetVariable (a quarter
with expected_version), 5% atomic SetVariables of five, 3% lock cycles
(StartOptimization, a SetVariable carrying the lock token, StopOptimization)
and 2% AddDependency (x5 -> x6, its type changed). Every ``--report-every``
seconds a line per operation; at the end every variable is read back and
compared with the last acknowledged write, and the results go to ``--out``
as JSON.
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))

import grpc  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402

from dspex_bridge._generate import generate  # noqa: E402

generate()
from dspex_bridge import values  # noqa: E402
from dspex_bridge._proto import bridge_service_pb2 as pb  # noqa: E402
from dspex_bridge._proto import bridge_service_pb2_grpc as pb_grpc  # noqa: E402

OPS = ["read", "write", "write_cas", "batch", "lock_cycle", "dep_change"]
REFUSALS = {"overloaded", "rate_limited", "busy", "circuit_open"}
VARS = [f"x{i}" for i in range(10)]
# The driver's own values are integers: their wire form (shared/wire/
# bridge_service.md, the JSON of the value) built and read here directly,
# the same bytes as values.encode/decode without their general dispatch.
INT_URL = values.PREFIX + "integer"
# No retries (the driver counts every refusal itself) and no per-call retry
# buffering in the channel.
CHANNEL_OPTIONS = [("grpc.enable_retries", 0)]
METHODS = ["GetVariable", "SetVariable", "SetVariables", "StartOptimization",
           "StopOptimization", "AddDependency"]


def int_any(v):
    return any_pb2.Any(type_url=INT_URL, value=str(v).encode())


def value_of(var):
    """A variable's value: integers directly, anything else by values.decode."""
    v = var.value
    if v.type_url == INT_URL:
        try:
            return int(v.value)
        except ValueError:
            pass
    return values.decode(v, var.binary_value)

# -------------------------------------------------------------- histograms
# The Elixir driver's layout (bench/load/lib/hist.ex): ns, 64 linear
# buckets, then 32 per octave up to 2^40.
LINEAR, SUB, SIZE = 64, 32, 64 + 34 * 32


def index(ns):
    if ns < LINEAR:
        return max(ns, 0)
    e = ns.bit_length() - 1
    return min(LINEAR + (e - 6) * SUB + ((ns >> (e - 5)) - SUB), SIZE - 1)


def upper(i):
    if i < LINEAR:
        return i
    j = i - LINEAR
    e = j // SUB + 6
    sub = j % SUB + SUB
    return ((sub + 1) << (e - 5)) - 1


def percentile(counts, total, q):
    if total <= 0:
        return None
    rank = max(1, -(-total * q // 100))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return upper(i)
    return upper(len(counts) - 1)


def one_stats():
    return {"ok": [0] * SIZE, "refused": [0] * SIZE, "service": [0] * SIZE, "ok_sum": 0,
            "ref_sum": 0, "ok_max": 0, "ref_max": 0, "errors": 0, "unanswered": 0}


def new_stats():
    return {op: one_stats() for op in OPS}


def merge_one(x, y):
    x["ok"] = [p + q for p, q in zip(x["ok"], y["ok"])]
    x["refused"] = [p + q for p, q in zip(x["refused"], y["refused"])]
    x["service"] = [p + q for p, q in zip(x["service"], y["service"])]
    for k in ("ok_sum", "ref_sum", "errors", "unanswered"):
        x[k] += y[k]
    x["ok_max"] = max(x["ok_max"], y["ok_max"])
    x["ref_max"] = max(x["ref_max"], y["ref_max"])
    return x


def merge(a, b):
    for op in OPS:
        merge_one(a[op], b[op])
    return a


def lat(counts, n, total, mx):
    if n == 0:
        return None
    # A bucket's upper bound, never above the largest value seen.
    out = {f"p{q}": round(min(percentile(counts, n, q), mx) / 1000, 1) for q in (50, 95, 99)}
    out["p99.9"] = round(min(percentile(counts, n, 99.9), mx) / 1000, 1)
    out["mean"] = round(total / n / 1000, 1)
    out["max"] = round(mx / 1000, 1)
    return out


def figures(s, seconds):
    ok, refused = sum(s["ok"]), sum(s["refused"])
    return {"ok": ok, "refused": refused, "errors": s["errors"], "unanswered": s["unanswered"],
            "ok_per_s": round(ok / seconds, 1) if seconds > 0 else 0.0,
            "refused_per_s": round(refused / seconds, 1) if seconds > 0 else 0.0,
            "latency_us": lat(s["ok"], ok, s["ok_sum"], s["ok_max"]),
            "refused_latency_us": lat(s["refused"], refused, s["ref_sum"], s["ref_max"]),
            "refused_service_us": ({f"p{q}": round(percentile(s["service"], refused, q) / 1000, 1)
                                    for q in (50, 99)} if refused else None)}


def all_of(stats):
    total = one_stats()
    for op in OPS:
        merge_one(total, stats[op])
    return total


def record(stats, op, cls, ns):
    s = stats[op]
    if cls == "ok":
        s["ok"][index(ns)] += 1
        s["ok_sum"] += ns
        s["ok_max"] = max(s["ok_max"], ns)
    elif cls == "refused":
        s["refused"][index(ns)] += 1
        s["ref_sum"] += ns
        s["ref_max"] = max(s["ref_max"], ns)
    elif cls == "error":
        s["errors"] += 1
    else:
        s["unanswered"] += 1


def rate_at(segments, t):
    for a, b, r0, r1 in segments:
        if t < a:
            return 0.0
        if t < b:
            return r0 + (r1 - r0) * (t - a) / max(b - a, 1)
    return 0.0


def pick(r):
    if r <= 70:
        return "read"
    if r <= 85:
        return "write"
    if r <= 90:
        return "write_cas"
    if r <= 95:
        return "batch"
    if r <= 98:
        return "lock_cycle"
    return "dep_change"


def reason_of(message):
    return (message or "error").split(":", 1)[0].strip() or "error"


# ------------------------------------------------------------------ client

class Client:
    """One process: its sessions, its expectations, its stats."""

    def __init__(self, n, args, sessions, queue):
        self.n = n
        self.args = args
        self.sessions = sessions
        self.queue = queue
        self.md_list = [("authorization", f"Bearer {args.token}")]
        self.md = grpc.aio.Metadata(*self.md_list)
        self.timeout = args.timeout / 1000
        # per session: [value, version, certain] per variable; edge type
        self.expect = {s: [[0, args.prefill, True] for _ in VARS] for s in sessions}
        self.edge = {s: "data" for s in sessions}
        self.pending = {s: [] for s in sessions}
        self.busy = set()
        self.counter = 0
        self.stats = new_stats()
        self.reasons = {}
        self.tasks = set()
        self.nsessions = len(sessions)

    def connect(self):
        """The channels and, per method, its multicallable on each channel."""
        channels = [grpc.aio.insecure_channel(self.args.address, options=CHANNEL_OPTIONS)
                    for _ in range(self.args.channels)]
        stubs = [pb_grpc.BridgeServiceStub(c) for c in channels]
        self.rpcs = {m: [getattr(s, m) for s in stubs] for m in METHODS}
        self.nch = len(channels)
        return channels

    def note(self, op, cls, reason):
        key = f"{op}/{cls}/{reason}"
        self.reasons[key] = self.reasons.get(key, 0) + 1

    async def call(self, method, req, md=None):
        fns = self.rpcs[method]
        fn = fns[0] if self.nch == 1 else fns[int(random.random() * self.nch)]
        return await fn(req, timeout=self.timeout, metadata=md or self.md)

    # Each op returns (class, reason).
    async def op_read(self, sid):
        i = int(random.random() * 10)
        resp = await self.call("GetVariable", pb.GetVariableRequest(
            session_id=sid, variable_identifier=VARS[i]))
        value = value_of(resp.variable)
        want, _, certain = self.expect[sid][i]
        if certain and value != want:
            return "error", "stale_read"
        return "ok", None

    async def op_write(self, sid, cas):
        i = int(random.random() * 9)
        self.counter += 1
        value = self.counter * 10
        _, version, certain = self.expect[sid][i]
        req = pb.SetVariableRequest(session_id=sid, variable_identifier=VARS[i],
                                    value=int_any(value))
        if cas and certain:
            req.expected_version = version
            req.has_expected_version = True
        try:
            resp = await self.call("SetVariable", req)
        except grpc.aio.AioRpcError as err:
            # Refused (RESOURCE_EXHAUSTED): not done. Anything else: unknown.
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.expect[sid][i] = [None, None, False]
            raise
        if resp.success:
            self.expect[sid][i] = [value, version + 1 if certain else None, certain]
            return "ok", None
        reason = reason_of(resp.error_message)
        return ("refused" if reason in REFUSALS else "error"), reason

    async def op_batch(self, sid):
        self.counter += 1
        base = self.counter * 10
        req = pb.BatchSetVariablesRequest(session_id=sid, atomic=True)
        for i in range(5):
            req.updates[VARS[i]].CopyFrom(int_any(base + i))
        try:
            resp = await self.call("SetVariables", req)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                for i in range(5):
                    self.expect[sid][i] = [None, None, False]
            raise
        if resp.success and not resp.errors:
            for i in range(5):
                v, version, certain = self.expect[sid][i]
                self.expect[sid][i] = [base + i, version + 1 if certain else None, certain]
            return "ok", None
        reason = reason_of(next(iter(resp.errors.values()), "error"))
        return ("refused" if reason in REFUSALS else "error"), reason

    async def op_lock_cycle(self, sid):
        opt = f"py{self.n}-{sid}"
        resp = await self.call("StartOptimization", pb.StartOptimizationRequest(
            session_id=sid, variable_identifier="x9", optimizer_id=opt,
            optimizer_config={"conflict_resolution": "wait", "timeout_ms": "1000"}))
        if not resp.success:
            reason = reason_of(resp.error_message)
            return ("refused" if reason in REFUSALS else "error"), reason
        md = grpc.aio.Metadata(*self.md_list, ("x-dspex-lock-token", str(resp.lock_token)),
                               ("x-dspex-optimizer-id", resp.optimization_id))
        self.counter += 1
        value = self.counter * 10
        _, version, certain = self.expect[sid][9]
        try:
            set_resp = await self.call("SetVariable", pb.SetVariableRequest(
                session_id=sid, variable_identifier="x9",
                value=int_any(value)), md)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.expect[sid][9] = [None, None, False]
            await self.stop(sid, md)
            raise
        # What the write did is known before the stop is asked (which may be
        # refused in its turn).
        if set_resp.success:
            self.expect[sid][9] = [value, version + 1 if certain else None, certain]
        stopped = await self.stop(sid, md)
        if not set_resp.success:
            reason = reason_of(set_resp.error_message)
            return ("refused" if reason in REFUSALS else "error"), reason
        if stopped is not True:
            return stopped
        return "ok", None

    async def stop(self, sid, md):
        """Releases the lock; a refused release is asked again (the lock
        must not stay with this caller), up to its timeout."""
        deadline = time.perf_counter() + self.timeout
        while True:
            try:
                stop = await self.call("StopOptimization", pb.StopOptimizationRequest(
                    session_id=sid, variable_identifier="x9"), md)
                return True if stop.success else ("error", "stop_optimization_failed")
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.perf_counter() > deadline:
                    return ("error", f"stop_{err.code().name.lower()}")
                await asyncio.sleep(0.005)

    async def op_dep_change(self, sid):
        kind = "control" if self.edge[sid] == "data" else "data"
        resp = await self.call("AddDependency", pb.AddDependencyRequest(
            session_id=sid, from_variable="x5", to_variable="x6", dependency_type=kind))
        if resp.success:
            self.edge[sid] = kind
            return "ok", None
        reason = reason_of(resp.error_message)
        return ("refused" if reason in REFUSALS else "error"), reason

    async def run_op(self, op, sid):
        try:
            if op == "read":
                return await self.op_read(sid)
            if op in ("write", "write_cas"):
                return await self.op_write(sid, op == "write_cas")
            if op == "batch":
                return await self.op_batch(sid)
            if op == "lock_cycle":
                return await self.op_lock_cycle(sid)
            return await self.op_dep_change(sid)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "refused", "resource_exhausted"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "unanswered", "deadline_exceeded"
            return "error", code.name.lower()

    async def session_loop(self, sid):
        queue = self.pending[sid]
        limit = self.args.timeout * 1_000_000
        while queue:
            intended, op = queue.pop(0)
            if time.perf_counter_ns() - intended > limit:
                record(self.stats, op, "unanswered", 0)
                continue
            started = time.perf_counter_ns()
            cls, reason = await self.run_op(op, sid)
            took = time.perf_counter_ns() - intended
            if cls == "refused":
                # The refusal's own round trip, without the queue before it.
                self.stats[op]["service"][index(time.perf_counter_ns() - started)] += 1
            if took > limit and cls != "unanswered":
                cls, reason = "unanswered", f"late_{cls}"
            record(self.stats, op, cls, took)
            if cls != "ok":
                self.note(op, cls, reason)
        self.busy.discard(sid)

    def dispatch(self, intended):
        sid = self.sessions[int(random.random() * self.nsessions)]
        self.pending[sid].append((intended, pick(int(random.random() * 100) + 1)))
        if sid not in self.busy:
            self.busy.add(sid)
            task = asyncio.ensure_future(self.session_loop(sid))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def closed(self, seconds, start_at):
        """Every session's loop calls as fast as it is answered, for
        ``seconds``: what the path can serve (ops answered, refused)."""
        channels = self.connect()
        await asyncio.gather(*(c.channel_ready() for c in channels))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + seconds
        counts = {"ok": 0, "refused": 0, "other": 0}

        async def loop(sid):
            backoff = 0.0
            while time.perf_counter() < end:
                cls, _ = await self.run_op(pick(random.randint(1, 100)), sid)
                counts[cls if cls in counts else "other"] += 1
                # Refused: back off (1 ms doubling to 64 ms) rather than spin.
                if cls == "refused":
                    backoff = min(max(backoff * 2, 0.001), 0.064)
                    await asyncio.sleep(backoff)
                else:
                    backoff = 0.0

        await asyncio.gather(*(loop(sid) for sid in self.sessions))
        self.queue.put(("closed", self.n, counts))
        for c in channels:
            await c.close()

    async def get(self, sid, name):
        """GetVariable, asked again while refused (a refusal says nothing
        about the data): (value, version), or (None, the status's name)."""
        for _ in range(500):
            try:
                resp = await self.call("GetVariable", pb.GetVariableRequest(
                    session_id=sid, variable_identifier=name))
                return (value_of(resp.variable), resp.variable.version)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return (None, err.code().name)
                await asyncio.sleep(0.01)
        return (None, "RESOURCE_EXHAUSTED")

    async def learn(self, sid):
        """What the session holds now (an earlier run, such as the overload
        profile's capacity probe, may have written to it)."""
        for i, name in enumerate(VARS):
            for _ in range(100):
                try:
                    resp = await self.call("GetVariable", pb.GetVariableRequest(
                        session_id=sid, variable_identifier=name))
                    value = value_of(resp.variable)
                    self.expect[sid][i] = [value, resp.variable.version, True]
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.01)

    async def run(self, segments, start_at):
        channels = self.connect()
        await asyncio.gather(*(c.channel_ready() for c in channels))
        await asyncio.gather(*(self.learn(sid) for sid in self.sessions))
        end_ms = max(b for _, b, _, _ in segments)
        share = self.args.procs
        # Everyone starts at the same wall-clock instant.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter_ns()
        k, carry = 0, random.random()
        next_report = t0 + int(self.args.report_every * 1e9)
        while k < end_ms:
            now = time.perf_counter_ns()
            now_ms = (now - t0) / 1e6
            if now_ms < k:
                await asyncio.sleep((k - now_ms) / 1000)
                continue
            while k <= now_ms and k < end_ms:
                carry += rate_at(segments, k) / share / 1000
                n = int(carry)
                carry -= n
                intended = t0 + k * 1_000_000
                for _ in range(n):
                    self.dispatch(intended)
                k += 1
            if now >= next_report:
                self.flush()
                next_report += int(self.args.report_every * 1e9)
            # Let the calls run between ticks.
            await asyncio.sleep(0)
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.flush()
        verify = await self.verify()
        self.queue.put(("verify", self.n, verify, self.reasons))
        for c in channels:
            await c.close()

    def flush(self):
        self.queue.put(("stats", self.n, self.stats))
        self.stats = new_stats()

    async def verify(self):
        checked, lost, examples = 0, 0, []
        for sid in self.sessions:
            got = {}
            for name in VARS + ["d"]:
                got[name] = await self.get(sid, name)
            for i, name in enumerate(VARS):
                value, version, certain = self.expect[sid][i]
                if not certain:
                    continue
                if got[name] == (value, version):
                    checked += 1
                else:
                    lost += 1
                    if len(examples) < 5:
                        examples.append([sid, name, [value, version], list(got[name])])
            # The derived variable catches up with its inputs (polled: the
            # gRPC API has no await_propagation).
            for _ in range(50):
                x0, x1, d = got["x0"][0], got["x1"][0], got["d"][0]
                if isinstance(x0, int) and isinstance(x1, int) and d == x0 + x1:
                    break
                await asyncio.sleep(0.1)
                for name in ("x0", "x1", "d"):
                    got[name] = await self.get(sid, name)
            else:
                lost += 1
                if len(examples) < 5:
                    examples.append([sid, "d", "derived_behind", [got["x0"][0], got["x1"][0], got["d"][0]]])
        return {"checked": checked, "lost": lost, "examples": examples}


def proc_main(n, args, sessions, segments, start_at, queue):
    random.seed(os.getpid())
    client = Client(n, args, sessions, queue)
    # DSPEX_LOAD_PROFILE=DIR: each process writes its cProfile to DIR.
    prof_dir = os.environ.get("DSPEX_LOAD_PROFILE")
    if prof_dir:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        if args.closed:
            asyncio.run(client.closed(args.closed, start_at))
        else:
            asyncio.run(client.run(segments, start_at))
    except Exception as err:  # reported, so the controller's checks fail
        queue.put(("crash", n, repr(err)))
    if prof_dir:
        prof.disable()
        prof.dump_stats(os.path.join(prof_dir, f"grpc_load.{n}.prof"))


# ------------------------------------------------------------------ parent

def fmt_rate(r):
    return f"{r / 1000:.1f}k" if r >= 10_000 else f"{round(r)}"


def fmt_us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v}us"


def line(label, stats, seconds, offered):
    total = figures(all_of(stats), seconds)
    done = total["ok"] + total["refused"] + total["errors"]
    lt = total["latency_us"] or {}
    out = [f"[{label}] {fmt_rate(done / max(seconds, 1e-3))} ops/s (offered {fmt_rate(offered)}): "
           f"ok {total['ok']} refused {total['refused']} errors {total['errors']} "
           f"unanswered {total['unanswered']} | all p50 {fmt_us(lt.get('p50'))} "
           f"p95 {fmt_us(lt.get('p95'))} p99 {fmt_us(lt.get('p99'))} max {fmt_us(lt.get('max'))}"]
    for op in OPS:
        f = figures(stats[op], seconds)
        if f["ok"] + f["refused"] + f["errors"] == 0:
            continue
        lo = f["latency_us"] or {}
        s = (f"    {op:<11} {fmt_rate(f['ok_per_s']):>8}/s p50 {fmt_us(lo.get('p50'))} "
             f"p95 {fmt_us(lo.get('p95'))} p99 {fmt_us(lo.get('p99'))} max {fmt_us(lo.get('max'))}")
        if f["refused"]:
            s += f" | refused {f['refused']} (p99 {fmt_us((f['refused_latency_us'] or {}).get('p99'))})"
        if f["errors"]:
            s += f" | errors {f['errors']}"
        if f["unanswered"]:
            s += f" | unanswered {f['unanswered']}"
        out.append(s)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--sessions", required=True, help="comma-separated session ids")
    ap.add_argument("--segments", required=True, help="JSON [[from_ms, to_ms, r0, r1], ...]")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--channels", type=int, default=4, help="HTTP/2 connections per process")
    ap.add_argument("--timeout", type=int, default=5000, help="ms")
    ap.add_argument("--report-every", type=float, default=10.0)
    ap.add_argument("--prefill", type=int, default=0,
                    help="writes each variable had (read back from the server at the start anyway)")
    ap.add_argument("--label", default="grpc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--closed", type=float, default=0.0,
                    help="closed loop for this many seconds instead; prints the capacity")
    args = ap.parse_args()

    sessions = [s for s in args.sessions.split(",") if s]
    segments = json.loads(args.segments)
    groups = [sessions[i::args.procs] for i in range(args.procs)]
    queue = mp.Queue()
    start_at = time.time() + 1.5
    procs = [mp.Process(target=proc_main, args=(n, args, g, segments, start_at, queue))
             for n, g in enumerate(groups)]
    for p in procs:
        p.start()

    if args.closed:
        counts = {"ok": 0, "refused": 0, "other": 0}
        for _ in procs:
            msg = queue.get(timeout=args.closed + 120)
            if msg[0] == "closed":
                for k, v in msg[2].items():
                    counts[k] += v
        for p in procs:
            p.join(timeout=30)
        result = {"capacity": counts["ok"] / args.closed, "counts": counts}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
        print(json.dumps(result))
        return

    totals = new_stats()
    interval = new_stats()
    got = {}
    intervals = []
    verify = {"checked": 0, "lost": 0, "examples": []}
    reasons = {}
    crashes = []
    done = 0
    last = time.time()
    begin = start_at
    while done < len(procs):
        try:
            msg = queue.get(timeout=1.0)
        except Exception:
            if not any(p.is_alive() for p in procs):
                break
            continue
        kind, n = msg[0], msg[1]
        if kind == "stats":
            merge(interval, msg[2])
            got[n] = got.get(n, 0) + 1
            # One interval = one report from every live process.
            if min(got.get(i, 0) for i in range(len(procs))) > len(intervals):
                now = time.time()
                seconds = max(now - last, 1e-3)
                t_ms = (now - begin) * 1000
                offered = rate_at(segments, max(t_ms - seconds * 500, 0))
                print(line(f"{args.label} t={round(now - begin)}s", interval, seconds, offered), flush=True)
                intervals.append({"t_s": round(now - begin, 1), "seconds": round(seconds, 2),
                                  "offered_ops_s": round(offered, 1),
                                  "ops": {op: figures(interval[op], seconds) for op in OPS}})
                merge(totals, interval)
                interval = new_stats()
                last = now
        elif kind == "verify":
            v = msg[2]
            verify["checked"] += v["checked"]
            verify["lost"] += v["lost"]
            verify["examples"] = (verify["examples"] + v["examples"])[:10]
            for k, c in msg[3].items():
                reasons[k] = reasons.get(k, 0) + c
            done += 1
        elif kind == "crash":
            crashes.append(msg[2])
            done += 1
    for p in procs:
        p.join(timeout=30)
    merge(totals, interval)

    length_s = max(b for _, b, _, _ in segments) / 1000
    result = {
        "summary": {"all": figures(all_of(totals), length_s),
                    "ops": {op: figures(totals[op], length_s) for op in OPS}},
        "intervals": intervals,
        "verify": verify,
        "reasons": reasons,
        "procs": args.procs,
        "channels": args.channels,
        "checks": {"no client process crashed": not crashes},
        "crashes": crashes,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
