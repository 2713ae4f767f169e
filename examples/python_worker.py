"""A Python optimizer sharing a session with the Elixir side (run by
examples/python_demo.exs): reads, writes with expected_version, takes the
optimization lock, watches a derived variable recompute, and rolls back."""
import os
import threading

from dspex_bridge import SessionContext, VersionMismatchError

ctx = SessionContext(os.environ["DSPEX_ADDRESS"], os.environ["DSPEX_SESSION"],
                     token=os.environ["DSPEX_TOKEN"])


def say(msg):
    print(f"[python] {msg}", flush=True)


info = ctx.get_variable_info("temperature")
say(f"read temperature = {info['value']} (version {info['version']}), loss = {ctx['loss']}")

# A conditional write, then a stale one.
v = ctx.update_variable("temperature", 0.6, expected_version=info["version"])
say(f"wrote 0.6 with expected_version={info['version']} -> version {v}")
try:
    ctx.update_variable("temperature", 0.5, expected_version=info["version"])
except VersionMismatchError as e:
    say(f"stale write refused: version_mismatch, current version {e.current_version}")

# Watch the derived variable while optimizing its input under the lock.
watch = ctx.watch_variables(["loss"])
updates = []
got = threading.Event()


def reader():
    for u in watch:
        updates.append(u)
        if len(updates) >= 1 and abs(u.value - 0.0) < 1e-9:
            got.set()
            return


threading.Thread(target=reader, daemon=True).start()
opt = ctx.start_optimization("temperature", optimizer_id="py-grid-search")
say(f"optimization lock taken by {opt.optimizer_id} (fencing token {opt.lock_token})")
best = None
for t in (0.5, 0.4, 0.3):
    ctx.update_variable("temperature", t, metadata={"optimizer": opt.optimizer_id})
    loss = (t - 0.3) ** 2
    best = t if best is None or loss < (best - 0.3) ** 2 else best
    say(f"tried temperature {t}")
got.wait(10)
say("loss recomputed by Elixir, seen by the watch: " +
    ", ".join(f"v{u.version}={u.value:g}" for u in updates))
final = ctx.stop_optimization("temperature")
say(f"lock released; final temperature {final}")
watch.cancel()

# Roll back to the value we started from.
new_version = ctx.rollback_variable("temperature", info["version"])
say(f"rolled back to version {info['version']}'s value: temperature = {ctx['temperature']} "
    f"(as version {new_version})")
history = ctx.get_variable_history("temperature", limit=10)
say("history: " + ", ".join(f"v{e['version']}={e['value']}" for e in history))
ctx.close()
