"""Python clients of the chaos run: worker processes writing through the
gRPC gateway with the project's client (dspex_bridge.SessionContext).

Started by bench/chaos/run.exs; not meant to be run by hand. Each worker owns
its sessions and keeps the chaos mix on them (reads 70%, writes 10%, writes
with expected_version 10%, atomic batches 5%, lock cycles 5%) until "stop"
(or end of input) arrives on stdin. Every operation is one line on stdout:

    op CLIENT SID OP WRITES START_US DUR_US TIMEOUT_MS CLASS REASON READ

WRITES is "var=value,..." or "-", READ "var=value" or "-", CLASS one of ok,
refused, fail, unknown. Other lines: "ready N" once every worker's sessions
exist, "setup_failed CLIENT REASON", "hung CLIENT" for a worker that did not
stop in time, "done" at the end. Lines are shorter than PIPE_BUF, so the
workers' writes to the shared pipe never interleave.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import threading
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))

WRITTEN = ["w0", "w1", "w2", "w3"]
BATCH = ["b0", "b1"]
OWNED = WRITTEN + BATCH + ["lk"]
READABLE = WRITTEN + BATCH
MIX = [(70, "read"), (10, "write"), (10, "cas"), (5, "batch"), (5, "lock")]
REFUSALS = {"version_mismatch", "locked_by", "stale_lock_token", "already_optimizing",
            "not_optimizing", "rate_limited"}


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def pick(rng: random.Random) -> str:
    roll = rng.randint(1, 100)
    acc = 0
    for share, op in MIX:
        acc += share
        if roll <= acc:
            return op
    return "read"


def outcome_of(exc, write: bool):
    """(class, reason) of a failed call."""
    import grpc
    from dspex_bridge.errors import BatchError, BridgeError

    if isinstance(exc, BatchError) and exc.errors:
        exc = next(iter(exc.errors.values()))
    if isinstance(exc, BridgeError):
        code = exc.code
        reason = exc.reason if exc.reason not in (None, "", "error") else (
            code.name.lower() if code is not None else "error")
        if reason in REFUSALS:
            return "refused", reason
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED or reason in ("session_not_found",
                                                                    "circuit_open"):
            return "fail", reason
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL) or reason == "timeout_unknown_outcome":
            return ("unknown" if write else "fail"), reason
        return ("unknown" if write else "fail"), reason
    return ("unknown" if write else "fail"), type(exc).__name__


class Worker:
    def __init__(self, index, args, stop):
        self.id = f"grpc-{index}"
        self.args = args
        self.stop = stop
        self.rng = random.Random(index * 7919 + 1)
        self.n = 0
        self.sids = [f"{args.prefix}-{index}-{k}" for k in range(args.sessions_per_worker)]
        self.ctxs = {}

    def next(self) -> int:
        self.n += 1
        return self.n

    def setup(self):
        from dspex_bridge import SessionContext

        for sid in self.sids:
            ctx = SessionContext(self.args.address, sid, token=self.args.token,
                                 timeout=self.args.timeout, create=True)
            for var in OWNED:
                ctx.register_variable(var, "integer", 0)
            self.ctxs[sid] = ctx

    def timed(self, sid, op, writes, fun, write):
        start_us = time.time_ns() // 1000
        t0 = time.monotonic_ns()
        read = "-"
        try:
            result = fun()
            cls, reason = "ok", "-"
            if isinstance(result, tuple) and result[0] == "read":
                read = f"{result[1]}={result[2]}"
        except Exception as exc:  # every failure is recorded, none stops the worker
            result = exc
            cls, reason = outcome_of(exc, write)
        dur_us = (time.monotonic_ns() - t0) // 1000
        w = ",".join(f"{k}={v}" for k, v in writes) or "-"
        emit(f"op {self.id} {sid} {op} {w} {start_us} {dur_us} "
             f"{int(self.args.timeout * 1000)} {cls} {reason} {read}")
        return cls, result

    def step(self):
        sid = self.rng.choice(self.sids)
        ctx = self.ctxs[sid]
        op = pick(self.rng)
        if op == "read":
            var = self.rng.choice(READABLE)
            self.timed(sid, "read", [], lambda: ("read", var, ctx.get_variable_info(var)["value"]),
                       False)
        elif op == "write":
            var = self.rng.choice(WRITTEN)
            v = self.next()
            self.timed(sid, "write", [(var, v)], lambda: ctx.update_variable(var, v), True)
        elif op == "cas":
            var = self.rng.choice(WRITTEN)
            holder = {}

            def read():
                info = ctx.get_variable_info(var)
                holder["version"] = info["version"]
                return ("read", var, info["value"])

            cls, _ = self.timed(sid, "read", [], read, False)
            if cls == "ok":
                v = self.next()
                self.timed(sid, "cas", [(var, v)],
                           lambda: ctx.update_variable(var, v,
                                                       expected_version=holder["version"]), True)
        elif op == "batch":
            v, v2 = self.next(), self.next()
            self.timed(sid, "batch", [("b0", v), ("b1", v2)],
                       lambda: ctx.update_variables({"b0": v, "b1": v2}, atomic=True), True)
        else:
            cls, _ = self.timed(sid, "lock_acquire", [], lambda: ctx.start_optimization("lk"), True)
            if cls == "ok":
                v = self.next()
                self.timed(sid, "write", [("lk", v)], lambda: ctx.update_variable("lk", v), True)
            if cls in ("ok", "refused"):
                self.timed(sid, "lock_release", [],
                           lambda: ctx.stop_optimization("lk", force=cls != "ok"), True)

    def run(self, ready):
        try:
            self.setup()
        except Exception as exc:
            emit(f"setup_failed {self.id} {type(exc).__name__}:{str(exc)[:200].split()!r}")
            ready.put(False)
            return
        ready.put(True)
        pause = self.args.interval_ms / 1000.0
        while not self.stop.is_set():
            self.step()
            if pause > 0:
                time.sleep(pause)
        # Once every fault is healed: one read of each session, so that a
        # session still failing at the end shows as such.
        for sid in self.sids:
            ctx = self.ctxs[sid]
            self.timed(sid, "read", [], lambda: ("read", "w0", ctx.get_variable_info("w0")["value"]),
                       False)
        for ctx in self.ctxs.values():
            try:
                ctx.close()
            except Exception:
                pass


def worker_main(index, args, stop, ready):
    Worker(index, args, stop).run(ready)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sessions-per-worker", type=int, default=2)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--interval-ms", type=float, default=2.0)
    args = p.parse_args()

    ctx = mp.get_context("fork")
    stop = ctx.Event()
    ready = ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(i, args, stop, ready), daemon=True)
             for i in range(args.workers)]
    for proc in procs:
        proc.start()
    ok = sum(1 for _ in procs if ready.get())
    emit(f"ready {ok}")

    def watch_stdin():
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()
    deadline = time.monotonic() + 3 * args.timeout + 5
    for i, proc in enumerate(procs):
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            emit(f"hung grpc-{i}")
            proc.terminate()
    emit("done")


if __name__ == "__main__":
    main()
