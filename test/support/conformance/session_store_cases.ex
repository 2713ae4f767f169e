defmodule DSPex.Bridge.Conformance.SessionStoreCases do
  @moduledoc """
  Every `DSPex.Bridge.SessionStore` case, run against each backend by
  `DSPex.Bridge.SessionStoreTest`. Sessions a case creates beyond its own
  come from `DSPex.Bridge.Conformance.new_session/2` (or pass `backend:`),
  so they live in the backend under test.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [new_session: 1, new_session: 2, unique_id: 1]

  alias DSPex.Bridge.SessionStore
  alias DSPex.TelemetryHelper

  conformance "create_session/2: rejects duplicates and bad ids", %{sid: sid, backend: b} do
    assert {:error, :already_exists} = SessionStore.create_session(sid, backend: b)
    # An id is unique across backends.
    assert {:error, :already_exists} = SessionStore.create_session(sid, backend: other(b))

    assert {:error, {:invalid_argument, :bad_session_id}} =
             SessionStore.create_session("", backend: b)

    assert {:error, {:invalid_argument, :bad_session_id}} =
             SessionStore.create_session(:atom, backend: b)

    assert {:error, {:invalid_argument, :bad_session_id}} =
             SessionStore.create_session(String.duplicate("x", 300), backend: b)

    assert {:error, {:invalid_argument, :bad_ttl}} =
             SessionStore.create_session(unique_id(b), ttl: -5, backend: b)

    assert {:error, {:invalid_argument, :metadata_must_be_a_map}} =
             SessionStore.create_session(unique_id(b), metadata: [:x], backend: b)
  end

  conformance "create_session/2: rejects negative or huge history limits", %{backend: b} do
    h1 = unique_id(b)

    assert {:error, {:invalid_argument, {:max_history, -1}}} =
             SessionStore.create_session(h1, max_history: -1, backend: b)

    assert {:error, {:invalid_argument, {:max_history, 10_000_000}}} =
             SessionStore.create_session(unique_id(b), max_history: 10_000_000, backend: b)

    assert {:error, :session_not_found} = SessionStore.get_session(h1)
  end

  conformance "create_session/2: emits created and deleted events", %{backend: b} do
    ref =
      TelemetryHelper.attach([
        [:dspex, :bridge, :session, :created],
        [:dspex, :bridge, :session, :deleted]
      ])

    {:ok, sid} = SessionStore.create_session(unique_id(b), backend: b)

    assert_receive {[:dspex, :bridge, :session, :created], ^ref, _,
                    %{session_id: ^sid, backend: ^b}}

    :ok = SessionStore.delete_session(sid)
    assert_receive {[:dspex, :bridge, :session, :deleted], ^ref, _, %{session_id: ^sid}}
    assert {:error, :session_not_found} = SessionStore.delete_session(sid)
  end

  conformance "create_session/2: sessions expire after their ttl and emit :expired", ctx do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :session, :expired]])
    # Idle time counts from the last write or read: 500 ms leaves the two
    # calls below room on a loaded machine (the sweeper runs once a second).
    sid = new_session(ctx, ttl: 500)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    assert SessionStore.get_variable_value(sid, :x) == 1
    # The sweeper's next rounds find it expired.
    assert_receive {[:dspex, :bridge, :session, :expired], ^ref, _, %{session_id: ^sid}}, 5_000
    assert {:error, :session_not_found} = SessionStore.get_variable(sid, :x)
    refute sid in SessionStore.list_sessions()
  end

  conformance "register_variable/5 and types: all eight types with their coercions",
              %{sid: sid} do
    assert {:ok, _} = SessionStore.register_variable(sid, :f, :float, 1)
    assert SessionStore.get_variable_value(sid, :f) === 1.0
    assert {:ok, _} = SessionStore.register_variable(sid, :i, :integer, 3.0)
    assert SessionStore.get_variable_value(sid, :i) === 3
    assert {:ok, _} = SessionStore.register_variable(sid, :s, :string, "héllo")
    assert {:ok, _} = SessionStore.register_variable(sid, :b, :boolean, "true")
    assert SessionStore.get_variable_value(sid, :b) === true

    assert {:ok, _} =
             SessionStore.register_variable(sid, :c, :choice, "fast",
               constraints: %{choices: ["fast", "slow"]}
             )

    assert {:ok, _} =
             SessionStore.register_variable(sid, :m, :module, Enum,
               constraints: %{allowed_modules: [Enum, Map]}
             )

    assert {:ok, _} =
             SessionStore.register_variable(sid, :e, :embedding, [1, 2, 3],
               constraints: %{dimensions: 3}
             )

    assert SessionStore.get_variable_value(sid, :e) == [1.0, 2.0, 3.0]
    t = %{"shape" => [2, 2], "data" => [1, 2, 3, 4]}
    assert {:ok, _} = SessionStore.register_variable(sid, :t, :tensor, t)

    assert %{"shape" => [2, 2], "data" => [1.0, 2.0, 3.0, 4.0]} =
             SessionStore.get_variable_value(sid, :t)
  end

  conformance "register_variable/5 and types: names keep their form; atom and string forms are one name",
              %{sid: sid} do
    {:ok, id} = SessionStore.register_variable(sid, :temperature, :float, 0.5)
    assert {:ok, %{name: :temperature}} = SessionStore.get_variable(sid, "temperature")
    assert {:ok, %{name: :temperature}} = SessionStore.get_variable(sid, id)

    assert {:error, :already_exists} =
             SessionStore.register_variable(sid, "temperature", :float, 0.1)

    {:ok, _} = SessionStore.register_variable(sid, "label", :string, "x")
    assert {:ok, %{name: "label"}} = SessionStore.get_variable(sid, :label)
  end

  conformance "register_variable/5 and types: bad registrations", %{sid: sid} do
    assert {:error, {:invalid_argument, {:unknown_type, :nope}}} =
             SessionStore.register_variable(sid, :x, :nope, 1)

    assert {:error, {:invalid_value, {:expected, :float}}} =
             SessionStore.register_variable(sid, :x, :float, "1.0")

    assert {:error, {:constraint_violation, {:below_min, +0.0}}} =
             SessionStore.register_variable(sid, :x, :float, -1.0, constraints: %{min: 0.0})

    assert {:error, {:invalid_argument, :choice_needs_choices}} =
             SessionStore.register_variable(sid, :x, :choice, "a")

    assert {:error, {:invalid_argument, :name_must_be_atom_or_string}} =
             SessionStore.register_variable(sid, 42, :float, 1.0)

    assert {:error, {:invalid_argument, {:bad_constraint, :pattern}}} =
             SessionStore.register_variable(sid, :x, :string, "a", constraints: %{pattern: "("})

    assert {:error, :session_not_found} =
             SessionStore.register_variable("no-such-session", :x, :float, 1.0)

    assert {:ok, []} = SessionStore.list_variables(sid)
  end

  defp setup_update_variable_5(sid) do
    {:ok, _} =
      SessionStore.register_variable(sid, :temp, :float, 0.5, constraints: %{min: 0.0, max: 1.0})

    {:ok, _} =
      SessionStore.register_variable(sid, :label, :string, "ok",
        constraints: %{max_length: 5, pattern: "[a-z]+"}
      )

    :ok
  end

  conformance "update_variable/5: writes bump the version and emit :write", %{sid: sid} do
    setup_update_variable_5(sid)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :variable, :write]])
    assert :ok = SessionStore.update_variable(sid, :temp, 0.7, %{source: :test})

    assert_receive {[:dspex, :bridge, :variable, :write], ^ref, %{version: 1, duration_us: _},
                    %{session_id: ^sid, variable: :temp, metadata: %{source: :test}}}

    assert {:ok, %{value: 0.7, version: 1, last_write: %{source: :test}}} =
             SessionStore.get_variable(sid, :temp)
  end

  conformance "update_variable/5: bad values return errors and change nothing",
              %{sid: sid} do
    setup_update_variable_5(sid)

    bad = [
      {:temp, 1.5, {:constraint_violation, {:above_max, 1.0}}},
      {:temp, "0.7", {:invalid_value, {:expected, :float}}},
      {:temp, self(), {:invalid_value, :unsupported_term}},
      {:temp, make_ref(), {:invalid_value, :unsupported_term}},
      {:temp, fn -> 1 end, {:invalid_value, :unsupported_term}},
      {:temp, Integer.pow(2, 70), {:invalid_value, :integer_out_of_range}},
      {:label, <<0xFF, 0xFE>>, {:invalid_value, :invalid_utf8}},
      {:label, "toolong", {:constraint_violation, {:max_length, 5}}},
      {:label, "UPPER", {:constraint_violation, {:pattern, "[a-z]+"}}},
      {:label, String.duplicate("a", 10_000_000), {:too_large, 1_048_576}},
      {:label, [1 | 2], {:invalid_value, :improper_list}}
    ]

    for {name, value, reason} <- bad do
      assert {:error, ^reason} = SessionStore.update_variable(sid, name, value),
             "#{inspect(name)} <- #{inspect(value, limit: 3)}"
    end

    assert {:ok, %{version: 0, value: 0.5}} = SessionStore.get_variable(sid, :temp)
    assert {:ok, %{version: 0, value: "ok"}} = SessionStore.get_variable(sid, :label)
    assert {:ok, []} = SessionStore.get_variable_history(sid, :temp)
  end

  conformance "update_variable/5: deeply nested and non-serialisable metadata",
              %{sid: sid} do
    setup_update_variable_5(sid)
    deep = Enum.reduce(1..200, :leaf, fn _, acc -> [acc] end)

    assert {:error, {:invalid_value, :nested_too_deeply}} =
             SessionStore.update_variable(sid, :temp, 0.6, %{deep: deep})

    assert {:error, {:invalid_value, :unsupported_term}} =
             SessionStore.update_variable(sid, :temp, 0.6, %{pid: self()})

    assert {:error, {:invalid_argument, :metadata_must_be_a_map}} =
             SessionStore.update_variable(sid, :temp, 0.6, [:not, :a, :map])

    assert {:ok, %{version: 0}} = SessionStore.get_variable(sid, :temp)
  end

  conformance "update_variable/5: NaN and infinity cannot be stored", %{sid: sid} do
    setup_update_variable_5(sid)
    # The BEAM cannot build NaN or infinity; they only arrive via snapshots
    # and the port, whose decoders reject them (see the import tests).
    assert {:error, {:invalid_value, {:expected, :float}}} =
             SessionStore.update_variable(sid, :temp, :nan)

    assert {:error, {:invalid_value, {:expected, :float}}} =
             SessionStore.update_variable(sid, :temp, :infinity)
  end

  conformance "update_variable/5: unknown session or variable", %{sid: sid} do
    setup_update_variable_5(sid)
    assert {:error, :session_not_found} = SessionStore.update_variable("nope", :temp, 0.1)
    assert {:error, :not_found} = SessionStore.update_variable(sid, :nope, 0.1)
    assert {:error, :not_found} = SessionStore.get_variable(sid, :nope)
    assert SessionStore.get_variable_value(sid, :nope, :default) == :default
    assert SessionStore.get_variable_value("nope", :temp) == nil
  end

  conformance "update_variable/5: expected_version: mismatch changes nothing and emits :version_conflict",
              %{sid: sid} do
    setup_update_variable_5(sid)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :variable, :version_conflict]])
    assert :ok = SessionStore.update_variable(sid, :temp, 0.6, %{expected_version: 0})

    assert {:error, {:version_mismatch, 1}} =
             SessionStore.update_variable(sid, :temp, 0.7, %{"expected_version" => 0})

    assert_receive {[:dspex, :bridge, :variable, :version_conflict], ^ref, %{current_version: 1},
                    %{expected_version: 0}}

    assert {:error, {:version_mismatch, 1}} =
             SessionStore.update_variable(sid, :temp, 0.7, %{}, expected_version: 5)

    assert SessionStore.get_variable_value(sid, :temp) == 0.6
  end

  conformance "update_variable/5: two processes racing with the same expected_version: exactly one wins",
              %{sid: sid} do
    setup_update_variable_5(sid)

    for round <- 1..50 do
      {:ok, %{version: v}} = SessionStore.get_variable(sid, :temp)
      parent = self()

      results =
        for value <- [0.1, 0.2] do
          Task.async(fn ->
            send(parent, {:ready, self()})
            receive do: (:go -> :ok)
            SessionStore.update_variable(sid, :temp, value, %{expected_version: v})
          end)
        end

      pids = for _ <- results, do: receive(do: ({:ready, pid} -> pid))
      Enum.each(pids, &send(&1, :go))
      outcomes = Enum.map(results, &Task.await/1)
      assert Enum.count(outcomes, &(&1 == :ok)) == 1, "round #{round}: #{inspect(outcomes)}"
      assert {:error, {:version_mismatch, _}} = Enum.find(outcomes, &(&1 != :ok))
    end
  end

  conformance "update_variable/5: N concurrent writers lose no update", %{sid: sid} do
    setup_update_variable_5(sid)
    {:ok, _} = SessionStore.register_variable(sid, :counter, :integer, 0)
    {:ok, ctx_like} = {:ok, sid}

    1..8
    |> Enum.map(fn _ ->
      Task.async(fn ->
        for _ <- 1..250, do: increment(ctx_like, :counter)
      end)
    end)
    |> Enum.each(&Task.await(&1, 30_000))

    assert SessionStore.get_variable_value(sid, :counter) == 2_000
    assert {:ok, %{version: 2_000}} = SessionStore.get_variable(sid, :counter)
  end

  defp increment(sid, name) do
    {:ok, %{value: n, version: v}} = SessionStore.get_variable(sid, name)

    case SessionStore.update_variable(sid, name, n + 1, %{expected_version: v}) do
      :ok -> :ok
      {:error, {:version_mismatch, _}} -> increment(sid, name)
    end
  end

  defp setup_update_variables_3(sid) do
    {:ok, _} = SessionStore.register_variable(sid, :a, :float, 0.0)
    {:ok, _} = SessionStore.register_variable(sid, "b", :integer, 0)
    :ok
  end

  conformance "update_variables/3: atomic: all or nothing", %{sid: sid} do
    setup_update_variables_3(sid)

    assert {:error, {:validation_failed, %{"b" => {:invalid_value, {:expected, :integer}}}}} =
             SessionStore.update_variables(sid, [{:a, 1.0}, {"b", "x"}], atomic: true)

    assert SessionStore.get_variable_value(sid, :a) == 0.0

    assert {:error, {:validation_failed, %{missing: :not_found}}} =
             SessionStore.update_variables(sid, %{a: 1.0, missing: 1}, atomic: true)

    assert :ok = SessionStore.update_variables(sid, %{:a => 1.0, "b" => 2}, atomic: true)
    assert SessionStore.get_variable_value(sid, :a) == 1.0
    assert SessionStore.get_variable_value(sid, :b) == 2
  end

  conformance "update_variables/3: not atomic: each write stands alone", %{sid: sid} do
    setup_update_variables_3(sid)

    assert {:ok, %{:a => :ok, "b" => {:error, {:invalid_value, _}}}} =
             SessionStore.update_variables(sid, [{:a, 3.0}, {"b", "x"}])

    assert SessionStore.get_variable_value(sid, :a) == 3.0
  end

  conformance "update_variables/3: bad shapes", %{sid: sid} do
    setup_update_variables_3(sid)

    assert {:error, {:invalid_argument, {:bad_update, :oops}}} =
             SessionStore.update_variables(sid, [:oops])

    assert {:error, {:invalid_argument, {:bad_updates, 5}}} =
             SessionStore.update_variables(sid, 5)
  end

  conformance "get_variables/3 and list_variables/3: found and missing; glob filter",
              %{sid: sid} do
    for n <- [:temp_a, :temp_b, :other] do
      {:ok, _} = SessionStore.register_variable(sid, n, :integer, 1)
    end

    assert {:ok, %{found: found, missing: [:nope]}} =
             SessionStore.get_variables(sid, [:temp_a, :nope, "other"])

    assert Map.keys(found) |> Enum.sort() == [:temp_a, "other"] |> Enum.sort()

    {:ok, vars} = SessionStore.list_variables(sid, "temp_*")
    assert Enum.map(vars, & &1.name) == [:temp_a, :temp_b]
    {:ok, all} = SessionStore.list_variables(sid)
    assert length(all) == 3
  end

  conformance "get_variables/3 and list_variables/3: delete_variable/3", %{sid: sid} do
    {:ok, _} = SessionStore.register_variable(sid, :gone, :integer, 1)
    assert :ok = SessionStore.delete_variable(sid, :gone)
    assert {:error, :not_found} = SessionStore.delete_variable(sid, :gone)
    assert {:ok, _} = SessionStore.register_variable(sid, :gone, :integer, 2)
  end

  defp setup_history_and_rollback(sid) do
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 0)
    :ok
  end

  conformance "history and rollback: seed case: v1, v2, rollback to 1 gives v3 with v1's value",
              %{sid: sid} do
    setup_history_and_rollback(sid)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :variable, :rollback]])
    :ok = SessionStore.update_variable(sid, :a, 100)
    :ok = SessionStore.update_variable(sid, :a, 200)
    :ok = SessionStore.rollback_variable(sid, :a, 1)
    assert {:ok, %{value: 100, version: 3}} = SessionStore.get_variable(sid, :a)

    assert_receive {[:dspex, :bridge, :variable, :rollback], ^ref, %{version: 3, to_version: 1},
                    _}

    {:ok, history} = SessionStore.get_variable_history(sid, :a)
    assert Enum.map(history, & &1.version) == [2, 1, 0]
    assert Enum.map(history, & &1.value) == [200, 100, 0]
    assert %DateTime{} = hd(history).updated_at
    assert {:ok, [%{version: 2}]} = SessionStore.get_variable_history(sid, :a, 1)
  end

  conformance "history and rollback: history is bounded by max_history", ctx do
    sid = new_session(ctx, max_history: 3)
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 0)
    for i <- 1..10, do: :ok = SessionStore.update_variable(sid, :a, i)
    {:ok, history} = SessionStore.get_variable_history(sid, :a)
    assert Enum.map(history, & &1.version) == [9, 8, 7]
    assert {:error, :version_not_found} = SessionStore.rollback_variable(sid, :a, 2)
    assert SessionStore.get_variable_value(sid, :a) == 10
  end

  conformance "history and rollback: bad rollback arguments", %{sid: sid} do
    setup_history_and_rollback(sid)
    assert {:error, :version_not_found} = SessionStore.rollback_variable(sid, :a, 99)
    assert {:error, :version_not_found} = SessionStore.rollback_variable(sid, :a, -1)
    assert {:error, :version_not_found} = SessionStore.rollback_variable(sid, :a, "1")

    assert {:error, {:invalid_argument, {:limit, -5}}} =
             SessionStore.get_variable_history(sid, :a, -5)
  end

  conformance "export_session/1 and import_session/2: round trip keeps values, versions, history, constraints and name forms",
              %{sid: sid, backend: b} do
    {:ok, _} =
      SessionStore.register_variable(sid, :temp, :float, 0.1,
        constraints: %{max: 1.0},
        metadata: %{owner: "me"},
        description: "sampling temperature"
      )

    {:ok, _} = SessionStore.register_variable(sid, "model", :string, "gpt")
    :ok = SessionStore.update_variable(sid, :temp, 0.2, %{why: {:tuned, 1}})

    {:ok, snapshot} = SessionStore.export_session(sid)
    new = sid <> "_copy"
    assert {:ok, ^new} = SessionStore.import_session(snapshot, session_id: new, backend: b)
    ExUnit.Callbacks.on_exit(fn -> SessionStore.delete_session(new) end)
    assert {:ok, %{backend: ^b}} = SessionStore.get_session_diagnostics(new)

    {:ok, original} = SessionStore.get_variable(sid, :temp)
    {:ok, copy} = SessionStore.get_variable(new, :temp)
    assert Map.drop(copy, []) == original
    assert {:ok, %{name: "model"}} = SessionStore.get_variable(new, "model")
    assert {:ok, [%{version: 0, value: 0.1}]} = SessionStore.get_variable_history(new, :temp)

    assert {:error, {:constraint_violation, _}} = SessionStore.update_variable(new, :temp, 2.0)

    assert {:error, :already_exists} =
             SessionStore.import_session(snapshot, session_id: sid, backend: b)

    # Snapshots move between backends.
    moved = sid <> "_moved"

    assert {:ok, ^moved} =
             SessionStore.import_session(snapshot, session_id: moved, backend: other(b))

    ExUnit.Callbacks.on_exit(fn -> SessionStore.delete_session(moved) end)
    assert {:ok, ^original} = SessionStore.get_variable(moved, :temp)
  end

  # That garbage creates nothing at all is checked, for both backends, by
  # the synchronous DSPex.Bridge.SessionStoreImportTest.
  conformance "export_session/1 and import_session/2: garbage is rejected",
              %{backend: b} do
    garbage = [
      "",
      "garbage",
      <<0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>,
      :crypto.strong_rand_bytes(1024),
      # a valid MessagePack map with the wrong fields
      <<0x81, 0xA1, ?a, 0x01>>
    ]

    for bin <- garbage do
      id = unique_id(b)

      assert {:error, {:invalid_snapshot, msg}} =
               SessionStore.import_session(bin, session_id: id, backend: b)

      assert is_binary(msg)
      assert {:error, :session_not_found} = SessionStore.get_session(id)
    end

    assert {:error, {:invalid_snapshot, _}} =
             SessionStore.import_session(:not_a_binary, backend: b)
  end

  conformance "export_session/1 and import_session/2: a tampered snapshot with an invalid value is rejected",
              %{sid: sid, backend: b} do
    {:ok, _} = SessionStore.register_variable(sid, :n, :integer, 5, constraints: %{max: 10})
    {:ok, snapshot} = SessionStore.export_session(sid)
    # The integer 5 is encoded as the positive fixint 0x05 after "value";
    # turn it into 0x0B (11), which breaks max: 10.
    tampered = :binary.replace(snapshot, <<0xA5, "value", 0x05>>, <<0xA5, "value", 0x0B>>)
    refute tampered == snapshot

    assert {:error, {:invalid_snapshot, _}} =
             SessionStore.import_session(tampered, session_id: sid <> "_t", backend: b)
  end

  conformance "sessions are isolated: another principal is denied everything",
              %{sid: sid} = ctx do
    {:ok, _} = SessionStore.register_variable(sid, :secret, :string, "s3cr3t")
    other = new_session(ctx)
    p = [principal: other]

    assert {:error, :access_denied} = SessionStore.get_variable(sid, :secret, p)
    assert SessionStore.get_variable_value(sid, :secret, :denied, p) == :denied
    assert {:error, :access_denied} = SessionStore.update_variable(sid, :secret, "x", %{}, p)
    assert {:error, :access_denied} = SessionStore.get_variable_history(sid, :secret, 10, p)
    assert {:error, :access_denied} = SessionStore.rollback_variable(sid, :secret, 0, p)
    assert {:error, :access_denied} = SessionStore.delete_variable(sid, :secret, p)

    assert {:error, :access_denied} =
             SessionStore.register_variable(sid, :planted, :integer, 1, p)

    assert {:ok, []} = SessionStore.list_variables(sid, nil, p)

    assert {:ok, %{found: %{}, missing: [:secret]}} =
             SessionStore.get_variables(sid, [:secret], p)

    assert {:error, {:validation_failed, %{secret: :access_denied}}} =
             SessionStore.update_variables(sid, [{:secret, "x"}], p ++ [atomic: true])

    assert SessionStore.get_variable_value(sid, :secret) == "s3cr3t"
    # The session itself, named explicitly, is its own principal.
    assert SessionStore.get_variable_value(sid, :secret, nil, principal: sid) == "s3cr3t"
  end

  conformance "get_session_diagnostics/1: reports variables, versions, history and memory",
              %{sid: sid} do
    {:ok, _} = SessionStore.register_variable(sid, :a, :float, 0.0)
    for i <- 1..5, do: :ok = SessionStore.update_variable(sid, :a, i * 0.1)

    assert {:ok, %{variable_count: 1, memory_bytes: mem, variables: [var]}} =
             SessionStore.get_session_diagnostics(sid)

    assert mem > 0
    assert %{name: :a, version: 5, history_length: 5, type: :float} = var
    assert {:error, :session_not_found} = SessionStore.get_session_diagnostics("nope")
  end

  defp other(:nif), do: :port
  defp other(:port), do: :nif
end
