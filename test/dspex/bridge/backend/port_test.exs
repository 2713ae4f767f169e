defmodule DSPex.Bridge.Backend.PortTest do
  # Kills the shared port program: must not overlap with other tests.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Port, as: PortBackend
  alias DSPex.Bridge.{AccessControl, MsgPack, SessionStore}
  alias DSPex.TelemetryHelper

  # These tests are about the raw backend: its calls go unprotected by
  # DSPex.Bridge.State.Bridged (no breaker, retries or cache) here.
  setup do
    :ok = DSPex.Bridge.State.Bridged.uninstall(:port)
    on_exit(fn -> :ok = DSPex.Bridge.State.Bridged.install(:port) end)
    wait_for_port()
    :ok
  end

  # The program's os pid, once it runs: now, or at its next `:started`
  # event (attached before asking, so the event cannot be missed).
  defp wait_for_port do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])

    case PortBackend.os_pid() do
      pid when is_integer(pid) ->
        pid

      _ ->
        assert_receive {[:dspex, :bridge, :port, :started], ^ref, _, %{os_pid: pid}}, 5_000
        pid
    end
  end

  defp session(backend) do
    sid = "port_test_#{backend}_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: backend)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  describe "pipelining" do
    test "16 concurrent callers each see their own writes, in order" do
      sid = session(:port)

      for i <- 1..16, do: {:ok, _} = SessionStore.register_variable(sid, :"v#{i}", :integer, 0)

      1..16
      |> Enum.map(fn i ->
        Task.async(fn ->
          for n <- 1..300 do
            :ok = SessionStore.update_variable(sid, :"v#{i}", n)
            ^n = SessionStore.get_variable_value(sid, :"v#{i}")
          end
        end)
      end)
      |> Enum.each(&Task.await(&1, 30_000))

      for i <- 1..16,
          do: assert({:ok, %{version: 300}} = SessionStore.get_variable(sid, :"v#{i}"))
    end

    test "a call past its timeout returns {:error, :timeout} and leaves nothing behind" do
      assert PortBackend.request("session_list", [], 0) == {:error, :timeout}
      refute_receive _, 200
      assert {:ok, ids} = PortBackend.request("session_list", [])
      assert is_list(ids)
    end

    test "unknown commands and bad arguments are errors for that call only" do
      assert {:error, {:bad_request, "unknown command `format_disk`"}} =
               PortBackend.request("format_disk", [])

      assert {:error, {:bad_request, _}} = PortBackend.request("session_info", session: 42)
      # Arguments go by name: a misspelt one is refused, not defaulted.
      assert {:error, {:bad_request, "unknown field `sesion`" <> _}} =
               PortBackend.request("session_info", sesion: "s")

      assert {:error, {:invalid_value, :unsupported_term}} = PortBackend.request("x", pid: self())
      assert {:ok, _} = PortBackend.request("session_list", [])
    end
  end

  describe "the port program dies" do
    test "kill -9 mid-traffic: callers get errors, not hangs; the rest lives on; it restarts" do
      ref =
        TelemetryHelper.attach([
          [:dspex, :bridge, :port, :exited],
          [:dspex, :bridge, :port, :started]
        ])

      port_sid = session(:port)
      nif_sid = session(:nif)
      {:ok, _} = SessionStore.register_variable(port_sid, :x, :integer, 0)
      {:ok, _} = SessionStore.register_variable(nif_sid, :x, :integer, 0)
      os_pid = PortBackend.os_pid()

      test = self()

      callers =
        for i <- 1..16 do
          Task.async(fn ->
            first = SessionStore.update_variable(port_sid, :x, i)
            send(test, {:first, i, first})
            [first | hammer(port_sid, i, System.monotonic_time(:millisecond) + 2_000)]
          end)
        end

      # Every caller is in the middle of its traffic. Stopped first, the
      # program answers nothing: the kill then finds calls in flight (on a
      # loaded machine every caller could otherwise be between two calls).
      for i <- 1..16, do: assert_receive({:first, ^i, :ok}, 5_000)
      {_, 0} = System.cmd("kill", ["-STOP", Integer.to_string(os_pid)])
      assert DSPex.Wait.until(fn -> DSPex.Bridge.Admission.in_flight(:dspex_port) >= 4 end)
      {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])

      outcomes = callers |> Task.await_many(10_000) |> List.flatten()
      errors = Enum.reject(outcomes, &(&1 == :ok))
      assert outcomes -- errors != [], "some calls succeeded before the kill"
      assert {:error, :backend_unavailable} in errors

      assert Enum.all?(
               errors,
               &(&1 in [{:error, :backend_unavailable}, {:error, :session_not_found}])
             ),
             inspect(Enum.uniq(errors))

      # 137 (killed), or nil when a write found the pipe closed first and
      # the port went before its exit status could be reaped.
      assert_receive {[:dspex, :bridge, :port, :exited], ^ref, _,
                      %{os_pid: ^os_pid, status: status}},
                     5_000

      assert status in [137, nil]

      # The VM and the NIF's sessions never noticed.
      assert :ok = SessionStore.update_variable(nif_sid, :x, 42)
      assert SessionStore.get_variable_value(nif_sid, :x) == 42

      # A fresh program serves again; the old one's sessions went with it.
      assert_receive {[:dspex, :bridge, :port, :started], ^ref, _, %{os_pid: new_pid}}
                     when new_pid != os_pid,
                     5_000

      assert {:error, :session_not_found} = SessionStore.get_variable(port_sid, :x)
      again = session(:port)
      assert {:ok, _} = SessionStore.register_variable(again, :x, :integer, 7)
      assert SessionStore.get_variable_value(again, :x) == 7
    end
  end

  describe "a crash loop" do
    test "84 kill -9 in a row never reach the application; calls fail fast meanwhile; it comes back" do
      app = Process.whereis(DSPex.Bridge.Supervisor)
      port_sup = Process.whereis(DSPex.Bridge.Backend.Port.Supervisor)
      server = Process.whereis(PortBackend)
      ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])
      nif_sid = session(:nif)
      {:ok, _} = SessionStore.register_variable(nif_sid, :x, :integer, 0)

      # Quick restarts, so 84 of them take a moment (the default backoff
      # would stretch them over minutes).
      restart_delays(1, 20)

      Enum.reduce(1..84, PortBackend.os_pid(), fn i, os_pid ->
        kill(os_pid, "-9")
        :ok = SessionStore.update_variable(nif_sid, :x, i)
        next_start(ref, os_pid)
      end)

      assert Process.whereis(DSPex.Bridge.Supervisor) == app
      assert Process.whereis(DSPex.Bridge.Backend.Port.Supervisor) == port_sup
      # The server owns the program and outlived every one of them.
      assert Process.whereis(PortBackend) == server
      assert SessionStore.get_variable_value(nif_sid, :x) == 84

      # A long outage: while the program is down, calls are answered at once
      # (well inside the 5 s call timeout) and the backend has no pid.
      restart_delays(2_000, 2_000)
      os_pid = PortBackend.os_pid()
      kill(os_pid, "-9")
      sid = "crash_loop_#{System.unique_integer([:positive])}"
      assert {:error, :backend_unavailable} = SessionStore.create_session(sid, backend: :port)
      assert {:error, :backend_unavailable} = PortBackend.request("session_list", [])
      assert PortBackend.os_pid() == nil
      refute sid in SessionStore.list_sessions()

      # And then it is back.
      next_start(ref, os_pid, 10_000)
      port_sid = session(:port)
      assert {:ok, _} = SessionStore.register_variable(port_sid, :y, :integer, 7)
      assert SessionStore.get_variable_value(port_sid, :y) == 7

      # Leave the backoff reset for later tests: the death of a program that
      # ran for the longest delay (1 ms here; it has served several calls)
      # starts the count again.
      restart_delays(1, 1)
      os_pid = PortBackend.os_pid()
      kill(os_pid, "-9")
      next_start(ref, os_pid)
    end
  end

  describe "a stopped program (SIGSTOP) and short call timeouts" do
    setup do
      timeout = Application.fetch_env(:dspex_bridge, :port_timeout)
      Application.put_env(:dspex_bridge, :port_timeout, 200)
      on_exit(fn -> restore_env(:port_timeout, timeout) end)
      %{timeout: timeout}
    end

    test "a write past its timeout is :timeout_unknown_outcome (it may land later), a read :timeout",
         ctx do
      sid = session(:port)
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
      os_pid = stop_program()

      assert {:error, :timeout_unknown_outcome} = SessionStore.update_variable(sid, :x, 1)
      assert {:error, :timeout} = SessionStore.get_variable(sid, :x)
      assert {:error, :timeout} = PortBackend.request("session_list", [])
      # A guard takes a rate-limit token and audits a refusal: it writes.
      assert {:error, :timeout_unknown_outcome} =
               AccessControl.authorize(sid, :x, :write, principal: "someone")

      # A create past its timeout keeps the id: if the session does appear,
      # it is reachable (and no NIF session can take its id meanwhile).
      late = "late_#{System.unique_integer([:positive])}"

      assert {:error, :timeout_unknown_outcome} =
               SessionStore.create_session(late, backend: :port)

      on_exit(fn -> SessionStore.delete_session(late) end)
      assert {:error, :already_exists} = SessionStore.create_session(late, backend: :nif)

      kill(os_pid, "-CONT")
      restore_env(:port_timeout, ctx.timeout)

      # Both writes were only late: that is why their outcome is "unknown".
      assert {:ok, %{value: 1, version: 1}} = SessionStore.get_variable(sid, :x)
      assert {:ok, %{id: ^late}} = SessionStore.get_session(late)
    end

    test "list_sessions/0 says the port's sessions are missing instead of dropping them", ctx do
      port_sid = session(:port)
      nif_sid = session(:nif)
      os_pid = stop_program()

      assert {:error, {:partial, %{sessions: listed, missing: :port, reason: :timeout}}} =
               SessionStore.list_sessions()

      assert nif_sid in listed
      refute port_sid in listed

      kill(os_pid, "-CONT")
      restore_env(:port_timeout, ctx.timeout)
      listed = SessionStore.list_sessions()
      assert port_sid in listed and nif_sid in listed
    end
  end

  describe "atoms in replies" do
    test "names the VM has never seen come back as binaries and create no atoms" do
      # A port session whose values, write metadata, session metadata and
      # rule conditions carry placeholder atoms; in its snapshot the
      # placeholders are swapped for fresh names of the same length, as a
      # snapshot from elsewhere would carry them.
      n = 200
      sid = session(:port)
      placeholders = for i <- 1..n, do: "placeholder_#{String.pad_leading("#{i}", 5, "0")}"
      atoms = Enum.map(placeholders, &String.to_atom/1)

      for {atom, i} <- Enum.with_index(atoms) do
        {:ok, _} =
          SessionStore.register_variable(sid, "v#{i}", :choice, atom,
            constraints: %{choices: [atom]},
            access_rules: [
              %{session_pattern: :any, permissions: [:read], conditions: %{atom => 1}}
            ]
          )

        :ok = SessionStore.update_variable(sid, "v#{i}", atom, %{atom => atom})
      end

      {:ok, snapshot} = SessionStore.export_session(sid)

      # Twice: the first import warms up whatever loads lazily, the second
      # counts atoms.
      for round <- [:warm_up, :measured] do
        fresh = for _ <- placeholders, do: fresh_name()
        swapped = Enum.zip(placeholders, fresh) |> Enum.reduce(snapshot, &swap/2)
        new_id = "fresh_#{System.unique_integer([:positive])}"
        before = :erlang.system_info(:atom_count)

        {:ok, ^new_id} = SessionStore.import_session(swapped, session_id: new_id, backend: :port)

        on_exit(fn -> SessionStore.delete_session(new_id) end)

        for {name, i} <- Enum.with_index(fresh) do
          assert {:ok, var} = SessionStore.get_variable(new_id, "v#{i}")
          assert var.value == name
          assert var.last_write == %{name => name}
          assert [%{conditions: conditions}] = var.access_rules
          assert conditions == %{name => 1}
          assert {:ok, [%{value: ^name} | _]} = SessionStore.get_variable_history(new_id, "v#{i}")
        end

        grown = :erlang.system_info(:atom_count) - before

        for name <- fresh do
          assert_raise ArgumentError, fn -> :erlang.binary_to_existing_atom(name, :utf8) end
        end

        if round == :measured, do: assert(grown < div(n, 10))
      end
    end
  end

  # The port program's replies are decoded against the vocabulary the NIF
  # creates when it loads: every error kind and reply key must be in it.
  test "the engine's vocabulary is made of atoms before any reply carries it" do
    names = Enum.map(DSPex.Bridge.Native.vocabulary(), &Atom.to_string/1)
    core = Path.expand("../../../../native/dspex_core/src", __DIR__)
    error_rs = File.read!(Path.join(core, "error.rs"))
    kinds = for [_, kind] <- Regex.scan(~r/=> "([a-z_]+)"/, error_rs), uniq: true, do: kind
    assert length(kinds) > 10
    assert kinds -- names == []

    reply_rs = File.read!(Path.join(core, "command/reply.rs"))

    keys =
      for [_, list] <- Regex.scan(~r/_KEYS: \[&str; \d+\] = \[(.*?)\];/s, reply_rs),
          [_, key] <- Regex.scan(~r/"([a-z_]+)"/, list),
          uniq: true,
          do: key

    assert length(keys) > 20
    assert keys -- names == []
    assert ~w(version_not_found session_id updated_at write embedding) -- names == []
  end

  # `writes?/1` is the core's `Operation::WRITES`, read from the sources here.
  test "the port's writes are the core's Operation::WRITES, command by command" do
    core = Path.expand("../../../../native/dspex_core/src/command", __DIR__)

    declared =
      for file <- Path.wildcard(Path.join(core, "*.rs")),
          [_, name, writes] <-
            Regex.scan(
              ~r/const NAME: &'static str = "([a-z_]+)";\s*const WRITES: bool = (true|false);/,
              File.read!(file)
            ),
          do: {name, writes == "true"}

    assert length(declared) > 30
    assert Enum.sort(declared) == Enum.sort(DSPex.Bridge.Native.command_catalog())
    for {name, writes} <- declared, do: assert(PortBackend.writes?(name) == writes, name)
    refute PortBackend.writes?("no_such_command")
  end

  defp fresh_name, do: "f" <> Base.encode16(:crypto.strong_rand_bytes(8))

  defp swap({placeholder, fresh}, bin), do: :binary.replace(bin, placeholder, fresh, [:global])

  defp stop_program do
    os_pid = PortBackend.os_pid()
    kill(os_pid, "-STOP")
    # Never leave a stopped program behind, whatever the test did.
    on_exit(fn ->
      System.cmd("kill", ["-CONT", Integer.to_string(os_pid)], stderr_to_stdout: true)
    end)

    os_pid
  end

  defp kill(os_pid, signal) when is_integer(os_pid) do
    {_, 0} = System.cmd("kill", [signal, Integer.to_string(os_pid)])
  end

  # The next program start after `old`'s, awaited on its telemetry event.
  defp next_start(ref, old, timeout \\ 5_000) do
    receive do
      {[:dspex, :bridge, :port, :started], ^ref, _, %{os_pid: pid}}
      when is_integer(pid) and pid != old ->
        pid
    after
      timeout -> flunk("the port program did not restart")
    end
  end

  defp restart_delays(min, max) do
    saved = Application.fetch_env(:dspex_bridge, :port)
    config = Application.get_env(:dspex_bridge, :port, [])

    Application.put_env(
      :dspex_bridge,
      :port,
      Keyword.merge(config, min_restart_delay_ms: min, max_restart_delay_ms: max)
    )

    # Only the first call of a test saves what to restore.
    unless Process.get(:saved_port_env), do: on_exit(fn -> restore_env(:port, saved) end)
    Process.put(:saved_port_env, true)
  end

  defp restore_env(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore_env(key, :error), do: Application.delete_env(:dspex_bridge, key)

  defp hammer(sid, i, deadline) do
    if System.monotonic_time(:millisecond) > deadline do
      []
    else
      [SessionStore.update_variable(sid, :x, i) | hammer(sid, i, deadline)]
    end
  end

  describe "bad input straight to the program" do
    setup do
      port =
        Port.open({:spawn_executable, PortBackend.executable()}, [
          :binary,
          {:packet, 4},
          :exit_status,
          args: ["--max-frame-bytes", "1024"]
        ])

      on_exit(fn -> if Port.info(port), do: Port.close(port) end)
      %{port: port}
    end

    defp reply(port) do
      receive do
        {^port, {:data, frame}} ->
          {:ok, [id, result]} = MsgPack.decode(frame)
          {id, result}

        {^port, {:exit_status, status}} ->
          flunk("the program exited with #{status}")
      after
        2_000 -> flunk("no reply")
      end
    end

    defp frame(id, command, args) do
      IO.iodata_to_binary([0x92, MsgPack.uint(id), MsgPack.encode!(%{command => args})])
    end

    test "each bad frame gets an error reply and the program carries on", %{port: port} do
      # Not MessagePack: no id to answer to.
      Port.command(port, <<0xC1, 0xC1, "junk">>)
      assert {nil, {:error, {:bad_request, _}}} = reply(port)

      # An empty frame.
      Port.command(port, "")
      assert {nil, {:error, {:bad_request, _}}} = reply(port)

      # Unknown command: answered by id.
      Port.command(port, frame(7, "launch_rockets", %{}))
      assert {7, {:error, {:bad_request, "unknown command `launch_rockets`"}}} = reply(port)

      # Truncated body: answered by id.
      good = frame(8, "session_create", %{"session" => "s"})
      Port.command(port, binary_part(good, 0, byte_size(good) - 1))
      assert {8, {:error, {:bad_request, _}}} = reply(port)

      # Arguments of the wrong type: answered by id.
      Port.command(port, frame(9, "session_create", %{"session" => %{}}))
      assert {9, {:error, {:bad_request, _}}} = reply(port)

      # Arguments by position: refused, the wire form never follows field order.
      Port.command(port, frame(13, "session_create", ["s"]))

      assert {13, {:error, {:bad_request, "expected a command {name => %{argument => value}}"}}} =
               reply(port)

      # Oversized (limit 1024 here): skipped unread, answered by id.
      Port.command(
        port,
        frame(10, "session_create", %{
          "session" => "big",
          "metadata" => %{m: :binary.copy("x", 5000)}
        })
      )

      assert {10, {:error, {:too_large, 1024}}} = reply(port)

      # Random garbage, many times.
      for _ <- 1..200, do: Port.command(port, :crypto.strong_rand_bytes(:rand.uniform(100)))
      for _ <- 1..200, do: assert({_, {:error, _}} = reply(port))

      # Still serving.
      Port.command(port, frame(11, "session_create", %{"session" => "s"}))
      assert {11, :ok} = reply(port)
      Port.command(port, frame(12, "session_list", %{}))
      assert {12, {:ok, ["s"]}} = reply(port)
    end

    test "end of input: the program exits on its own", %{port: port} do
      {:os_pid, os_pid} = Port.info(port, :os_pid)
      Port.close(port)
      assert exits_within?(os_pid, 2_000)
    end
  end

  # No message announces the exit of a program this VM no longer holds a
  # port to: ask the OS, within a deadline.
  defp exits_within?(os_pid, ms) do
    DSPex.Wait.until(
      fn ->
        match?(
          {_, 1},
          System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true)
        )
      end,
      timeout: ms
    )
  end
end
