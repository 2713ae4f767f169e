# assert_receive waits up to a second (ExUnit's default is 100 ms): CI shares
# two cores with the build, and a message that is merely late is not a bug.
ExUnit.start(capture_log: true, assert_receive_timeout: 1_000)

# Seed 002's test calls `:telemetry.execute/3`: without a real `:telemetry`,
# a shim in memory forwards to the library's dispatcher (see its moduledoc).
DSPex.SeedCompat.TelemetryShim.load()

# Replicated sessions this test VM makes live in a fresh ra data directory
# per run (the default one persists, by design, and would bring back the
# sessions of earlier runs): restart the library and ra on one.
ra_dir = Path.join(System.tmp_dir!(), "dspex_ra_test_#{:os.getpid()}")
File.rm_rf!(ra_dir)
:ok = Application.stop(:dspex_bridge)
_ = Application.stop(:ra)
Application.put_env(:dspex_bridge, :ra_data_dir, ra_dir)
{:ok, _} = Application.ensure_all_started(:dspex_bridge)
ExUnit.after_suite(fn _ -> File.rm_rf(ra_dir) end)

# Without ra on the code path (scripts/setup.sh fetches it into .cache/ra),
# the replicated-session tests cannot run: leave them out, and say so.
unless DSPex.Bridge.Backend.Raft.System.available?() do
  IO.puts("ra is not on the code path (run scripts/setup.sh): the :ha tests are excluded")
  ExUnit.configure(exclude: [:ha])
end
