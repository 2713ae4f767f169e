# State.Bridged: a port read through a closed breaker (breaker ask and
# record, the retry policy, the last-known-value cache kept up to date)
# against the plain port backend read of the same request, in one run.
#
#   MIX_ENV=prod mix run bench/bridged_bench.exs
Code.require_file("harness.exs", __DIR__)

alias DSPex.Bridge.{CircuitBreaker, MsgPack, SessionStore}
alias DSPex.Bridge.Backend.Port
alias DSPex.Bridge.State.Bridged

sid = "bench-bridged"
{:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
{:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.5)
:ok = CircuitBreaker.reset(Bridged.breaker(:port))

# The request `Port.get_value(sid, :temperature, nil)` sends, encoded once:
# both cases send exactly these bytes.
args = [MsgPack.encode!(sid), MsgPack.encode_ident!(:temperature), <<0xC0>>, <<0xC0>>]
{:ok, 0.5} = Port.bridged_execute("var_get_value", args)

plain = fn -> Port.bridged_execute("var_get_value", args) end

bridged = fn ->
  Bridged.run(:port, "var_get_value", args, false, fn ->
    Port.bridged_execute("var_get_value", args)
  end)
end

{:ok, 0.5} = bridged.()

results =
  DSPex.Bench.run(
    %{"plain port read" => plain, "State.Bridged read, closed breaker" => bridged},
    title: "port read: plain vs State.Bridged (one round trip per call)",
    batch: 1,
    time: 6,
    warmup: 1,
    rounds: 6
  )

IO.puts("\n## ratio\n")
# Throughput of the plain read over the bridged one: the bridged read's cost
# in units of the plain read's.
cost = DSPex.Bench.ratio(results, "plain port read", "State.Bridged read, closed breaker")
us = fn name -> Float.round(results[name].p50_ns / 1000, 2) end
loadavg = File.read!("/proc/loadavg") |> String.split() |> hd()

IO.puts("""

| case | p50 | cost vs plain | target |
| --- | --- | --- | --- |
| plain port read | #{us.("plain port read")} us | 1.0x | |
| State.Bridged read, closed breaker | #{us.("State.Bridged read, closed breaker")} us | #{Float.round(cost, 3)}x | <= 1.15x |

(load average during the run: #{loadavg}, #{System.schedulers_online()} schedulers)
""")
