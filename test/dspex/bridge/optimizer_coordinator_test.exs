defmodule DSPex.Bridge.OptimizerCoordinatorTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{OptimizerCoordinator, SessionStore}
  alias DSPex.TelemetryHelper

  doctest OptimizerCoordinator

  @events for e <- [
                :started,
                :progress,
                :completed,
                :failed,
                :lock_acquired,
                :lock_released,
                :lock_conflict,
                :preempted,
                :lock_expired
              ],
              do: [:dspex, :optimization, e]

  setup do
    %{key: "var_#{System.unique_integer([:positive])}"}
  end

  defp opt(name), do: "#{name}_#{System.unique_integer([:positive])}"

  # Starts a process that acquires `key` and reports back; it then holds
  # the lock until told to release or to stop.
  defp holder(key, optimizer, opts \\ []) do
    test = self()

    pid =
      spawn(fn ->
        result = OptimizerCoordinator.acquire_lock(key, optimizer, self(), opts)
        send(test, {:acquired, self(), result})

        receive do
          :release ->
            send(test, {:released, self(), OptimizerCoordinator.release_lock(key, optimizer)})

          :stop ->
            :ok
        end
      end)

    pid
  end

  # Queued waiters and grants have no event of their own: polled.
  defp await_waiters(key, n) do
    assert DSPex.Wait.until(fn ->
             match?({:ok, %{waiters: ^n}}, OptimizerCoordinator.get_lock_info(key))
           end),
           "never saw #{n} waiters on #{inspect(key)}"
  end

  describe "seed 002 cases" do
    test "prevents concurrent optimization of the same variable", %{key: key} do
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, "opt1", self())

      result =
        Task.async(fn ->
          OptimizerCoordinator.acquire_lock(key, "opt2", self(), conflict_resolution: :abort)
        end)
        |> Task.await()

      assert {:error, {:lock_held_by, "opt1"}} = result
      assert :ok = OptimizerCoordinator.release_lock(key, "opt1")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, "opt2", self())
      assert :ok = OptimizerCoordinator.release_lock(key, "opt2")
    end

    test "a crashed holder's lock is taken by a new optimizer", %{key: key} do
      {:ok, pid} =
        Task.start(fn ->
          {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, "crash_opt", self())
          receive do: (:crash -> exit(:crashed))
        end)

      await_locked(key, "crash_opt")
      ref = Process.monitor(pid)
      send(pid, :crash)
      assert_receive {:DOWN, ^ref, :process, ^pid, :crashed}, 1_000

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, "new_opt", self(), timeout: 1_000)

      assert {:ok, %{optimizer_id: "new_opt"}} = OptimizerCoordinator.get_lock_info(key)
    end
  end

  defp await_locked(key, optimizer) do
    assert DSPex.Wait.until(fn ->
             match?({:ok, %{optimizer_id: ^optimizer}}, OptimizerCoordinator.get_lock_info(key))
           end),
           "#{optimizer} never got #{inspect(key)}"
  end

  describe "acquire_lock/4 with :wait" do
    test "grants to three waiters in FIFO order", %{key: key} do
      first = opt("first")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, first, self())

      waiters =
        for {name, n} <- Enum.with_index(["a", "b", "c"], 1) do
          pid = holder(key, opt(name))
          await_waiters(key, n)
          pid
        end

      assert :ok = OptimizerCoordinator.release_lock(key, first)

      for pid <- waiters do
        assert_receive {:acquired, ^pid, {:ok, :lock_acquired_after_wait}}, 1_000
        refute_received {:acquired, _, _}
        send(pid, :release)
        assert_receive {:released, ^pid, :ok}, 1_000
      end

      assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(key)
    end

    test "a waiter whose timeout passed does not get the lock", %{key: key} do
      owner = opt("owner")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      late = opt("late")

      {us, result} =
        :timer.tc(fn ->
          Task.async(fn -> OptimizerCoordinator.acquire_lock(key, late, self(), timeout: 50) end)
          |> Task.await()
        end)

      assert result == {:error, :timeout}
      assert us >= 50_000
      assert {:ok, %{waiters: 0}} = OptimizerCoordinator.get_lock_info(key)
      assert :ok = OptimizerCoordinator.release_lock(key, owner)
      assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(key)
      assert {:error, :not_found} = OptimizerCoordinator.get_optimization_status(late)
    end

    test "a waiter killed while queued leaves the queue", %{key: key} do
      owner = opt("owner")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      doomed = holder(key, opt("doomed"))
      await_waiters(key, 1)
      survivor = holder(key, opt("survivor"))
      await_waiters(key, 2)

      Process.exit(doomed, :kill)
      await_waiters(key, 1)
      assert :ok = OptimizerCoordinator.release_lock(key, owner)
      assert_receive {:acquired, ^survivor, {:ok, :lock_acquired_after_wait}}, 1_000
      refute_received {:acquired, ^doomed, _}
      send(survivor, :release)
      assert_receive {:released, ^survivor, :ok}, 1_000
    end

    test "the next waiter gets the lock as soon as the holder dies", %{key: key} do
      dying = holder(key, opt("dying"))
      assert_receive {:acquired, ^dying, {:ok, :lock_acquired}}, 1_000
      waiter = holder(key, opt("next"), timeout: 2_000)
      await_waiters(key, 1)
      Process.exit(dying, :kill)
      assert_receive {:acquired, ^waiter, {:ok, :lock_acquired_after_wait}}, 500
      send(waiter, :stop)
    end

    test "timeout: :infinity waits until granted", %{key: key} do
      owner = opt("owner")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      waiter = holder(key, opt("patient"), timeout: :infinity)
      await_waiters(key, 1)
      :ok = OptimizerCoordinator.release_lock(key, owner)
      assert_receive {:acquired, ^waiter, {:ok, :lock_acquired_after_wait}}, 1_000
      send(waiter, :stop)
    end

    test "the holder acquiring again keeps the lock", %{key: key} do
      owner = opt("owner")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      {:ok, %{token: token}} = OptimizerCoordinator.get_lock_info(key)

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, owner, self(), conflict_resolution: :abort)

      assert {:ok, %{token: ^token}} = OptimizerCoordinator.get_lock_info(key)
      :ok = OptimizerCoordinator.release_lock(key, owner)
    end
  end

  describe "release_lock/2" do
    test "by a non-owner is refused and changes nothing", %{key: key} do
      owner = opt("owner")
      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(key, owner)
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(key, "intruder")
      assert {:ok, %{optimizer_id: ^owner}} = OptimizerCoordinator.get_lock_info(key)
      assert :ok = OptimizerCoordinator.release_lock(key, owner)
      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(key, owner)
    end
  end

  describe "acquire_lock/4 with :preempt" do
    test "waits while the holder has run fewer than 10 iterations", %{key: key} do
      old = opt("old")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, old, self())
      assert {:ok, true} = OptimizerCoordinator.report_progress(old, 9, 0.5, %{loss: 1.0})

      assert {:error, :timeout} =
               OptimizerCoordinator.acquire_lock(key, opt("new"), self(),
                 conflict_resolution: :preempt,
                 timeout: 30
               )

      assert {:ok, %{optimizer_id: ^old}} = OptimizerCoordinator.get_lock_info(key)
      refute_received {:optimization_preempted, _}
    end

    test "takes the lock at once after 10 iterations and tells the holder", %{key: key} do
      old = opt("old")
      new = opt("new")
      ref = TelemetryHelper.attach(@events)
      victim = holder(key, old)
      assert_receive {:acquired, ^victim, {:ok, :lock_acquired}}, 1_000
      {:ok, %{token: old_token}} = OptimizerCoordinator.get_lock_info(key)
      :erlang.trace(victim, true, [:receive])
      assert {:ok, true} = OptimizerCoordinator.report_progress(old, 10, 0.5, %{})

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, new, self(), conflict_resolution: :preempt)

      assert_receive {:trace, ^victim, :receive, {:optimization_preempted, ^key}}, 1_000
      assert {:ok, %{optimizer_id: ^new, token: token}} = OptimizerCoordinator.get_lock_info(key)
      assert token > old_token

      assert_receive {[:dspex, :optimization, :preempted], ^ref, _,
                      %{optimizer_id: ^old, preempted_by: ^new, token: ^old_token}},
                     1_000

      assert_receive {[:dspex, :optimization, :failed], ^ref, _,
                      %{optimizer_id: ^old, reason: :preempted}},
                     1_000

      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(key, old)
      send(victim, :stop)
      :ok = OptimizerCoordinator.release_lock(key, new)
    end
  end

  describe "a queued :preempt request" do
    test "takes the lock when the holder reports its 10th iteration", %{key: key} do
      old = opt("old")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, old, self())
      plain = holder(key, opt("plain"))
      await_waiters(key, 1)
      eager_id = opt("eager")
      eager = holder(key, eager_id, conflict_resolution: :preempt)
      await_waiters(key, 2)

      for i <- 1..9, do: {:ok, _} = OptimizerCoordinator.report_progress(old, i, i, %{})
      refute_received {:acquired, ^eager, _}
      {:ok, _} = OptimizerCoordinator.report_progress(old, 10, 10, %{})

      assert_receive {:acquired, ^eager, {:ok, :lock_acquired_after_wait}}, 1_000
      assert_receive {:optimization_preempted, ^key}, 1_000

      assert {:ok, %{optimizer_id: ^eager_id, waiters: 1}} =
               OptimizerCoordinator.get_lock_info(key)

      send(eager, :release)
      assert_receive {:released, ^eager, :ok}, 1_000
      assert_receive {:acquired, ^plain, {:ok, :lock_acquired_after_wait}}, 1_000
      send(plain, :stop)
    end
  end

  describe "leases" do
    test "an expired lock passes to the waiter", %{key: key} do
      ref = TelemetryHelper.attach(@events)
      owner = opt("owner")

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, owner, self(), lease: 100)

      # Nothing renews it: the waiter gets it when the lease runs out,
      # however long the machine takes to get there.
      waiter = holder(key, opt("heir"), timeout: 30_000)

      assert_receive {[:dspex, :optimization, :lock_expired], ^ref, _,
                      %{key: ^key, optimizer_id: ^owner}},
                     30_000

      assert_receive {:acquired, ^waiter, {:ok, :lock_acquired_after_wait}}, 30_000
      assert {:error, :not_lock_owner} = OptimizerCoordinator.renew_lock(key, owner)
      send(waiter, :stop)
    end

    test "renewal replaces the lease", %{key: key} do
      owner = opt("owner")

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, owner, self(), lease: 100)

      assert {:ok, %{lease_left_ms: left}} = OptimizerCoordinator.get_lock_info(key)
      assert left <= 100
      assert {:ok, _} = OptimizerCoordinator.renew_lock(key, owner, lease: 600_000)
      # More than the first lease could ever have left: the new one.
      assert {:ok, %{optimizer_id: ^owner, lease_left_ms: left}} =
               OptimizerCoordinator.get_lock_info(key)

      assert left > 100
    end

    test "progress renews the lease", %{key: key} do
      owner = opt("owner")

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock(key, owner, self(), lease: 4_000)

      # Until a quarter of the lease has gone (the engine's clock; no margin
      # is asserted on ours), then a report gives the whole lease back.
      used = lease_left_below(key, 3_000)
      assert {:ok, _} = OptimizerCoordinator.report_progress(owner, 1, 1, %{loss: 1.0})

      assert {:ok, %{optimizer_id: ^owner, lease_left_ms: left}} =
               OptimizerCoordinator.get_lock_info(key)

      assert left > used
    end
  end

  # The lease left on `key` once it is below `ms`, read from the lock table.
  defp lease_left_below(key, ms) do
    {:ok, %{lease_left_ms: left}} = OptimizerCoordinator.get_lock_info(key)

    if left < ms do
      left
    else
      # Time passing is the event: wait as long as the engine says is left.
      Process.sleep(left - ms + 1)
      lease_left_below(key, ms)
    end
  end

  describe "report_progress/4 and status" do
    test "keeps the best value by lowest :loss or :primary_metric", %{key: key} do
      owner = opt("owner")
      assert {:error, :not_optimizing} = OptimizerCoordinator.report_progress(owner, 1, 0, %{})
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())
      assert {:ok, true} = OptimizerCoordinator.report_progress(owner, 1, 0.1, %{loss: 0.9})
      assert {:ok, true} = OptimizerCoordinator.report_progress(owner, 2, 0.2, %{loss: 0.4})
      assert {:ok, false} = OptimizerCoordinator.report_progress(owner, 3, 0.3, %{loss: 0.6})

      assert {:ok, true} =
               OptimizerCoordinator.report_progress(owner, 4, 0.4, %{primary_metric: 0.1})

      assert {:ok, status} = OptimizerCoordinator.get_optimization_status(owner)

      assert %{
               optimizer_id: ^owner,
               iteration: 4,
               reports: 4,
               best_value: 0.4,
               best_metrics: %{primary_metric: 0.1},
               best_iteration: 4,
               keys: [^key],
               started_at: %DateTime{}
             } = status

      assert {:ok, all} = OptimizerCoordinator.get_all_active_optimizations()
      assert Enum.any?(all, &(&1.optimizer_id == owner))
      :ok = OptimizerCoordinator.release_lock(key, owner)
      assert {:error, :not_found} = OptimizerCoordinator.get_optimization_status(owner)
      assert {:ok, all} = OptimizerCoordinator.get_all_active_optimizations()
      refute Enum.any?(all, &(&1.optimizer_id == owner))
    end
  end

  describe "bad input" do
    test "start_link/1 answers bad options with an error, and the running coordinator stays" do
      running = Process.whereis(OptimizerCoordinator)

      for {opts, detail} <- [
            {[lease: 0], {:lease, 0}},
            {[preempt_after: -1], {:preempt_after, -1}},
            {[sweep_interval: :often], {:sweep_interval, :often}},
            {[leese: 10], {:unknown_options, [:leese]}},
            {:nope, {:bad_options, :nope}}
          ] do
        assert OptimizerCoordinator.start_link(opts) == {:error, {:invalid_argument, detail}}
      end

      assert Process.whereis(OptimizerCoordinator) == running
      assert {:error, {:already_started, ^running}} = OptimizerCoordinator.start_link([])
    end

    test "is answered with an error, never a crash", %{key: key} do
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}, 1_000
      acquire = &OptimizerCoordinator.acquire_lock(key, &1, &2, &3)

      assert {:error, {:invalid_argument, {:optimizer_id, 42}}} = acquire.(42, self(), [])
      assert {:error, {:invalid_argument, {:optimizer_id, ""}}} = acquire.("", self(), [])
      assert {:error, {:invalid_argument, {:pid, :nope}}} = acquire.("o", :nope, [])
      assert {:error, {:invalid_argument, :owner_not_alive}} = acquire.("o", dead, [])

      assert {:error, {:invalid_argument, {:conflict_resolution, :fight}}} =
               acquire.("o", self(), conflict_resolution: :fight)

      assert {:error, {:invalid_argument, {:timeout, -1}}} = acquire.("o", self(), timeout: -1)
      assert {:error, {:invalid_argument, {:lease, 0}}} = acquire.("o", self(), lease: 0)

      assert {:error, {:invalid_argument, {:unknown_options, [:bogus]}}} =
               acquire.("o", self(), bogus: 1)

      assert {:error, {:invalid_argument, {:bad_options, :not_a_list}}} =
               acquire.("o", self(), :not_a_list)

      assert {:error, :session_not_found} = acquire.("o", self(), session_id: "no-such-session")

      assert {:error, {:invalid_argument, _}} =
               OptimizerCoordinator.report_progress("o", -1, 0, %{})

      assert {:error, {:invalid_value, :unsupported_term}} =
               OptimizerCoordinator.report_progress("o", 1, self(), %{})

      assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(key)
    end

    test "any term is a key, atoms are optimizer ids" do
      key = {:tuple, make_ref(), [1, 2.0, "x"]}
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, :atom_opt, self())
      assert {:ok, %{optimizer_id: "atom_opt"}} = OptimizerCoordinator.get_lock_info(key)
      assert {:ok, %{keys: [^key]}} = OptimizerCoordinator.get_optimization_status(:atom_opt)
      assert :ok = OptimizerCoordinator.release_lock(key, :atom_opt)
    end
  end

  describe "the NIF boundary" do
    test "the lock table keeps the configuration it was created with" do
      alias DSPex.Bridge.Native

      assert {:error, {:invalid_argument, {:lock_table_exists, %{lease_ms: lease} = config}}} =
               Native.lock_table_init(1, 1)

      assert :ok = Native.lock_table_init(lease, config.preempt_after)
      assert {:error, {:invalid_argument, :bad_lease}} = Native.lock_table_init(0, 10)
    end

    test "garbage arguments give an error or an ArgumentError, never a crash" do
      alias DSPex.Bridge.Native

      garbage = [
        nil,
        -1,
        1.5,
        "",
        <<0xFF>>,
        :atom,
        {1},
        [1 | 2],
        %{},
        make_ref(),
        self(),
        Bitwise.bsl(1, 70)
      ]

      calls = [
        &Native.lock_acquire(&1, &1, self(), &1, &1, &1, &1),
        &Native.lock_acquire("k", "o", &1, :wait, 0, nil, nil),
        &Native.lock_release(&1, &1),
        &Native.lock_release_any(&1),
        &Native.lock_cancel(&1, &1),
        &Native.lock_renew(&1, &1, &1),
        &Native.lock_progress(&1, &1, &1, &1),
        &Native.lock_info(&1),
        &Native.lock_status(&1),
        &Native.lock_table_init(&1, &1)
      ]

      for call <- calls, arg <- garbage do
        try do
          case call.(arg) do
            {:error, _} -> :ok
            nil -> :ok
            :gone -> :ok
            {:ok, _} -> :ok
            {:ok, _, _} -> :ok
            {:ok, _, _, _} -> :ok
            other -> flunk("unexpected #{inspect(other)} for #{inspect(arg)}")
          end
        rescue
          ArgumentError -> :ok
        end
      end

      assert {:ok, :lock_acquired} =
               OptimizerCoordinator.acquire_lock("after-garbage", "o", self())

      :ok = OptimizerCoordinator.release_lock("after-garbage", "o")
    end
  end

  describe "telemetry" do
    test "acquire, conflict, release, death", %{key: key} do
      ref = TelemetryHelper.attach(@events)
      owner = opt("owner")
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key, owner, self())

      assert_receive {[:dspex, :optimization, :lock_acquired], ^ref, %{wait_us: _},
                      %{key: ^key, optimizer_id: ^owner, how: :immediate, token: _}},
                     1_000

      assert_receive {[:dspex, :optimization, :started], ^ref, _, %{optimizer_id: ^owner}}, 1_000

      assert {:error, _} =
               OptimizerCoordinator.acquire_lock(key, "other", self(), conflict_resolution: :abort)

      assert_receive {[:dspex, :optimization, :lock_conflict], ^ref, _,
                      %{key: ^key, optimizer_id: "other", resolution: :abort}},
                     1_000

      {:ok, _} = OptimizerCoordinator.report_progress(owner, 1, 1.0, %{loss: 1.0})

      assert_receive {[:dspex, :optimization, :progress], ^ref, %{iteration: 1},
                      %{optimizer_id: ^owner, best: true}},
                     1_000

      :ok = OptimizerCoordinator.release_lock(key, owner)

      assert_receive {[:dspex, :optimization, :lock_released], ^ref, _,
                      %{key: ^key, optimizer_id: ^owner, reason: :released}},
                     1_000

      assert_receive {[:dspex, :optimization, :completed], ^ref, _, %{optimizer_id: ^owner}},
                     1_000

      doomed = opt("doomed")
      pid = holder(key, doomed)
      assert_receive {:acquired, ^pid, {:ok, :lock_acquired}}, 1_000
      Process.exit(pid, :kill)

      assert_receive {[:dspex, :optimization, :lock_released], ^ref, _,
                      %{key: ^key, optimizer_id: ^doomed, reason: :owner_down}},
                     1_000

      assert_receive {[:dspex, :optimization, :failed], ^ref, _,
                      %{optimizer_id: ^doomed, reason: :owner_down}},
                     1_000
    end
  end

  describe "SessionStore optimization" do
    setup do
      sid = "oc_#{System.unique_integer([:positive])}"
      {:ok, ^sid} = SessionStore.create_session(sid)
      {:ok, id} = SessionStore.register_variable(sid, :temperature, :float, 0.5)
      on_exit(fn -> SessionStore.delete_session(sid) end)
      %{sid: sid, id: id}
    end

    test "optimizing another session's variable needs :optimize", %{sid: sid} do
      rules = [
        %{session_pattern: :any, permissions: [:read]},
        %{session_pattern: "admin_*", permissions: [:read, :optimize]}
      ]

      :ok = SessionStore.set_variable_permissions(sid, :temperature, rules)
      ref = TelemetryHelper.attach([[:dspex, :bridge, :access, :denied]])

      assert {:error, :access_denied} =
               SessionStore.start_optimization(sid, :temperature, self(), principal: "worker_1")

      assert_receive {[:dspex, :bridge, :access, :denied], ^ref, _,
                      %{principal: "worker_1", permission: :optimize}}

      assert {:error, :access_denied} =
               OptimizerCoordinator.acquire_lock(:temperature, "w", self(),
                 session_id: sid,
                 principal: "not_admin_1"
               )

      assert {:ok, %{optimizer_id: o}} =
               SessionStore.start_optimization(sid, :temperature, self(), principal: "admin_1")

      assert {:error, :access_denied} =
               SessionStore.stop_optimization(sid, :temperature,
                 optimizer_id: o,
                 principal: "worker_1"
               )

      assert :ok =
               SessionStore.stop_optimization(sid, :temperature,
                 optimizer_id: o,
                 principal: "admin_1"
               )
    end

    test "start_optimization locks the variable, by name or id", %{sid: sid, id: id} do
      assert {:ok, %{optimizer_id: "opt_" <> _ = o1, token: t1}} =
               SessionStore.start_optimization(sid, :temperature, self())

      assert {:error, {:already_optimizing, status}} =
               SessionStore.start_optimization(sid, id, self())

      assert %{optimizing: true, optimizer_id: ^o1, optimizer_pid: pid, token: ^t1} = status
      assert pid == self()

      assert {:ok, %{keys: [{:dspex_session, ^sid, ^id}]}} =
               OptimizerCoordinator.get_optimization_status(o1)

      assert {:error, {:locked_by, ^o1}} = SessionStore.update_variable(sid, :temperature, 0.7)
      assert {:error, {:locked_by, ^o1}} = SessionStore.delete_variable(sid, :temperature)
      assert :ok = SessionStore.update_variable(sid, :temperature, 0.7, %{}, lock_token: t1)
      assert :ok = SessionStore.update_variable(sid, id, 0.8, %{}, optimizer_id: o1)

      assert :ok =
               SessionStore.update_variables(sid, %{temperature: 0.9},
                 atomic: true,
                 lock_token: t1
               )

      assert {:error, {:validation_failed, %{temperature: {:locked_by, ^o1}}}} =
               SessionStore.update_variables(sid, %{temperature: 0.1}, atomic: true)

      assert {:error, :not_lock_owner} =
               SessionStore.stop_optimization(sid, :temperature, optimizer_id: "someone")

      assert :ok = SessionStore.stop_optimization(sid, :temperature, optimizer_id: o1)
      assert {:error, :not_optimizing} = SessionStore.stop_optimization(sid, :temperature)
      assert :ok = SessionStore.update_variable(sid, :temperature, 1.0)
      assert 1.0 == SessionStore.get_variable_value(sid, :temperature)
    end

    test "a raw {sid, id} key reaches neither the holder, its token nor the write fence",
         %{sid: sid, id: id} do
      {:ok, %{optimizer_id: o, token: token}} =
        SessionStore.start_optimization(sid, :temperature, self())

      assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info({sid, id})
      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock({sid, id}, o)
      assert {:error, {:locked_by, ^o}} = SessionStore.update_variable(sid, :temperature, 0.1)

      assert {:ok, %{optimizer_id: ^o, token: ^token}} =
               OptimizerCoordinator.get_lock_info(:temperature, session_id: sid)

      # A raw lock taken on the same pair is its own lock: no fence, no squat.
      :ok = SessionStore.stop_optimization(sid, :temperature, optimizer_id: o)
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock({sid, id}, "sq", self())
      assert :ok = SessionStore.update_variable(sid, :temperature, 0.2)

      assert {:ok, %{optimizer_id: o2}} =
               SessionStore.start_optimization(sid, :temperature, self())

      assert {:error, {:locked_by, ^o2}} = SessionStore.update_variable(sid, :temperature, 0.3)
      :ok = SessionStore.stop_optimization(sid, :temperature, optimizer_id: o2)
      :ok = OptimizerCoordinator.release_lock({sid, id}, "sq")
    end

    test "fencing: a preempted holder's token is stale", %{sid: sid} do
      {:ok, %{optimizer_id: o1, token: t1}} =
        SessionStore.start_optimization(sid, :temperature, self(), optimizer_id: "o1")

      {:ok, true} = OptimizerCoordinator.report_progress(o1, 10, 0.5, %{})

      {:ok, %{optimizer_id: "o2", token: t2}} =
        SessionStore.start_optimization(sid, :temperature, self(),
          optimizer_id: "o2",
          conflict_resolution: :preempt
        )

      assert t2 > t1
      assert_received {:optimization_preempted, :temperature}

      assert {:error, :stale_lock_token} =
               SessionStore.update_variable(sid, :temperature, 0.1, %{}, lock_token: t1)

      assert {:error, :stale_lock_token} =
               SessionStore.update_variable(sid, :temperature, 0.1, %{}, optimizer_id: "o1")

      assert {:error, {:locked_by, "o2"}} = SessionStore.update_variable(sid, :temperature, 0.1)
      assert :ok = SessionStore.update_variable(sid, :temperature, 0.2, %{}, lock_token: t2)
      assert :ok = SessionStore.stop_optimization(sid, :temperature)

      assert {:error, :stale_lock_token} =
               SessionStore.update_variable(sid, :temperature, 0.1, %{}, lock_token: t1)

      assert :ok = SessionStore.update_variable(sid, :temperature, 0.3)
    end

    test "a dead optimizer's variable is writable again", %{sid: sid} do
      test = self()

      pid =
        spawn(fn ->
          send(
            test,
            SessionStore.start_optimization(sid, :temperature, self(), optimizer_id: "mortal")
          )

          Process.sleep(:infinity)
        end)

      assert_receive {:ok, %{optimizer_id: "mortal"}}, 1_000

      assert {:error, {:locked_by, "mortal"}} =
               SessionStore.update_variable(sid, :temperature, 0.1)

      ref = Process.monitor(pid)
      Process.exit(pid, :kill)
      assert_receive {:DOWN, ^ref, _, _, _}, 1_000

      assert {:ok, %{optimizer_id: "next"}} =
               SessionStore.start_optimization(sid, :temperature, self(),
                 optimizer_id: "next",
                 conflict_resolution: :wait,
                 timeout: 1_000
               )
    end

    test "needs the optimize permission and an existing variable", %{sid: sid} do
      assert {:error, :access_denied} =
               SessionStore.start_optimization(sid, :temperature, self(), principal: "stranger")

      assert {:error, :not_found} = SessionStore.start_optimization(sid, :nope, self())
      assert {:error, :session_not_found} = SessionStore.start_optimization("nope", :x, self())
    end
  end

  describe "under load" do
    @tag timeout: 60_000
    test "50 processes on 10 keys with random kills: one holder per key, no one left hanging" do
      keys = for i <- 1..10, do: {:load, System.unique_integer([:positive]), i}
      table = :ets.new(:holders, [:public, :set])
      test = self()
      timeout = 100

      worker = fn n ->
        spawn(fn ->
          optimizer = "w#{n}"

          for _ <- 1..40 do
            key = Enum.random(keys)

            {us, result} =
              :timer.tc(fn ->
                OptimizerCoordinator.acquire_lock(key, optimizer, self(), timeout: timeout)
              end)

            # A wait may overrun its timeout only by scheduling noise.
            if us > (timeout + 500) * 1_000, do: send(test, {:hung, n, us})

            case result do
              {:ok, _} ->
                case :ets.insert_new(table, {key, self()}) do
                  true ->
                    :ok

                  false ->
                    [{^key, other}] = :ets.lookup(table, key)
                    # The previous holder may only have left by dying.
                    if Process.alive?(other), do: send(test, {:two_holders, key})
                    :ets.insert(table, {key, self()})
                end

                Process.sleep(:rand.uniform(3))
                :ets.delete_object(table, {key, self()})
                :ok = OptimizerCoordinator.release_lock(key, optimizer)

              {:error, :timeout} ->
                :ok
            end
          end

          send(test, {:done, n})
        end)
      end

      pids = for n <- 1..50, do: {n, worker.(n)}
      victims = pids |> Enum.take_random(15)

      for {_, pid} <- victims do
        Process.sleep(:rand.uniform(20))
        Process.exit(pid, :kill)
      end

      killed = MapSet.new(victims, fn {n, _} -> n end)

      for {n, _} <- pids, n not in killed do
        assert_receive {:done, ^n}, 30_000
      end

      refute_received {:two_holders, _}
      refute_received {:hung, _, _}

      for key <- keys do
        assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(key)
      end
    end
  end
end
