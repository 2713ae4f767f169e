# assert_receive waits up to a second (ExUnit's default is 100 ms): CI shares
# two cores with the build, and a message that is merely late is not a bug.
ExUnit.start(capture_log: true, assert_receive_timeout: 1_000)

# Seed 002's test calls `:telemetry.execute/3`: without a real `:telemetry`,
# a shim in memory forwards to the library's dispatcher (see its moduledoc).
DSPex.SeedCompat.TelemetryShim.load()
