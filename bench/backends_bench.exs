# The same read and write through both backends, in one run: the NIF (in
# the VM) is the baseline the port program (its own OS process, MessagePack
# frames over a pipe) is measured against.
#
#   MIX_ENV=prod mix run bench/backends_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule BackendsBench do
  alias DSPex.Bridge.SessionStore

  @callers 16

  def callers, do: @callers

  def setup do
    for backend <- [:nif, :port] do
      sid = sid(backend)
      {:ok, ^sid} = SessionStore.create_session(sid, backend: backend)
      {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.5)

      # One variable per concurrent writer, so writers measure the pipe, not
      # contention on one variable's lock.
      for i <- 1..@callers,
          do: {:ok, _} = SessionStore.register_variable(sid, :"t#{i}", :float, 0.5)
    end

    :persistent_term.put({__MODULE__, :next}, :counters.new(1, []))
  end

  def sid(backend), do: "bench-#{backend}"

  def read(backend), do: SessionStore.get_variable_value(sid(backend), :temperature)
  def write(backend), do: SessionStore.update_variable(sid(backend), :temperature, 0.7)

  def write_own(backend) do
    name = Process.get(:bench_var) || pick_var()
    SessionStore.update_variable(sid(backend), name, 0.7)
  end

  defp pick_var do
    counter = :persistent_term.get({__MODULE__, :next})
    :counters.add(counter, 1, 1)
    name = :"t#{rem(:counters.get(counter, 1), @callers) + 1}"
    Process.put(:bench_var, name)
    name
  end
end

BackendsBench.setup()
opts = [time: 3, warmup: 1]
n = BackendsBench.callers()

single =
  DSPex.Bench.run(
    %{
      "nif read" => fn -> BackendsBench.read(:nif) end,
      "port read" => fn -> BackendsBench.read(:port) end,
      "nif write" => fn -> BackendsBench.write(:nif) end,
      "port write" => fn -> BackendsBench.write(:port) end
    },
    # One call per sample: p50 is a single round trip.
    [title: "one caller: round trip per call", batch: 1] ++ opts
  )

concurrent =
  DSPex.Bench.run(
    %{
      "nif read, #{n} callers" => {fn -> BackendsBench.read(:nif) end, parallel: n},
      "port read, #{n} callers" => {fn -> BackendsBench.read(:port) end, parallel: n},
      "nif write, #{n} callers" => {fn -> BackendsBench.write_own(:nif) end, parallel: n},
      "port write, #{n} callers" => {fn -> BackendsBench.write_own(:port) end, parallel: n}
    },
    [title: "#{n} concurrent callers: throughput"] ++ opts
  )

us = fn ns -> Float.round(ns / 1000, 1) end
k = fn ips -> round(ips / 1000) end
port_read = concurrent["port read, #{n} callers"].ips
port_write = concurrent["port write, #{n} callers"].ips

IO.puts("""

## summary

| case | :nif | :port | target |
| --- | --- | --- | --- |
| read, 1 caller, p50 round trip | #{us.(single["nif read"].p50_ns)} us | #{us.(single["port read"].p50_ns)} us | reported |
| write, 1 caller, p50 round trip | #{us.(single["nif write"].p50_ns)} us | #{us.(single["port write"].p50_ns)} us | reported |
| read, #{n} callers | #{k.(concurrent["nif read, #{n} callers"].ips)} K ops/s | #{k.(port_read)} K ops/s | port >= 50 K ops/s |
| write, #{n} callers | #{k.(concurrent["nif write, #{n} callers"].ips)} K ops/s | #{k.(port_write)} K ops/s | port >= 50 K ops/s |
""")
