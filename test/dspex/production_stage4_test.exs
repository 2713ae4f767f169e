defmodule DSPex.ProductionStage4Test do
  # Seed 002's integration test, as written, but for its process-starting
  # setup lines: the library's application runs the store and the
  # coordinator already (`DSPex.SeedCompat.started/1` takes an
  # `{:error, {:already_started, pid}}` as the `{:ok, pid}` the seed
  # expects), and the store is `DSPex.Bridge.SessionStore`, not snakepit's.
  # `:telemetry.execute/3` reaches the library's dispatcher through
  # `DSPex.SeedCompat.TelemetryShim` where `:telemetry` is absent.
  use ExUnit.Case, async: false

  alias DSPex.SeedCompat

  alias DSPex.{Context, Variables}
  alias DSPex.Bridge.{DependencyManager, OptimizerCoordinator, AccessControl, Analytics}

  describe "dependency management" do
    setup do
      {:ok, _} = SeedCompat.started(DSPex.Bridge.SessionStore.start_link())
      {:ok, ctx} = Context.start_link()
      :ok = Context.ensure_bridged(ctx)

      # Get session ID
      %{id: session_id} = :sys.get_state(ctx)
      {:ok, _} = DependencyManager.start_link(session_id)

      {:ok, ctx: ctx, session_id: session_id}
    end

    test "prevents circular dependencies", %{ctx: ctx, session_id: session_id} do
      # Create variables
      {:ok, _} = Variables.defvariable(ctx, :a, :float, 1.0)
      {:ok, _} = Variables.defvariable(ctx, :b, :float, 2.0)
      {:ok, _} = Variables.defvariable(ctx, :c, :float, 3.0)

      # Create valid chain: a -> b -> c
      :ok = DependencyManager.add_dependency(session_id, :a, :b)
      :ok = DependencyManager.add_dependency(session_id, :b, :c)

      # Try to create cycle: c -> a
      assert {:error, :would_create_cycle} = DependencyManager.add_dependency(session_id, :c, :a)
    end

    test "calculates correct update order", %{ctx: ctx, session_id: session_id} do
      # Create dependency graph:
      # a -> b -> d
      #   \-> c -> d
      {:ok, _} = Variables.defvariable(ctx, :a, :float, 1.0)
      {:ok, _} = Variables.defvariable(ctx, :b, :float, 2.0)
      {:ok, _} = Variables.defvariable(ctx, :c, :float, 3.0)
      {:ok, _} = Variables.defvariable(ctx, :d, :float, 4.0)

      :ok = DependencyManager.add_dependency(session_id, :a, :b)
      :ok = DependencyManager.add_dependency(session_id, :a, :c)
      :ok = DependencyManager.add_dependency(session_id, :b, :d)
      :ok = DependencyManager.add_dependency(session_id, :c, :d)

      # Get update order when a changes
      {:ok, order} = DependencyManager.get_update_order(session_id, :a)

      # Should be [a, b, c, d] or [a, c, b, d]
      assert :a in order
      assert :d == List.last(order)
      assert index_of(order, :b) > index_of(order, :a)
      assert index_of(order, :c) > index_of(order, :a)
      assert index_of(order, :d) > index_of(order, :b)
      assert index_of(order, :d) > index_of(order, :c)
    end
  end

  describe "optimizer coordination" do
    setup do
      {:ok, _} = SeedCompat.started(OptimizerCoordinator.start_link([]))
      :ok
    end

    test "prevents concurrent optimization of same variable" do
      var_id = "test_var"

      # First optimizer acquires lock
      {:ok, :lock_acquired} =
        OptimizerCoordinator.acquire_lock(
          var_id,
          "opt1",
          self()
        )

      # Second optimizer tries to acquire - should wait
      task =
        Task.async(fn ->
          OptimizerCoordinator.acquire_lock(
            var_id,
            "opt2",
            self(),
            conflict_resolution: :abort
          )
        end)

      result = Task.await(task)
      assert {:error, {:lock_held_by, "opt1"}} = result

      # Release lock
      :ok = OptimizerCoordinator.release_lock(var_id, "opt1")

      # Now second optimizer can acquire
      {:ok, :lock_acquired} =
        OptimizerCoordinator.acquire_lock(
          var_id,
          "opt2",
          self()
        )
    end

    test "cleans up locks when optimizer crashes" do
      var_id = "crash_test_var"

      # Start optimizer in separate process
      {:ok, opt_pid} =
        Task.start(fn ->
          {:ok, :lock_acquired} =
            OptimizerCoordinator.acquire_lock(
              var_id,
              "crash_opt",
              self()
            )

          # Hold lock briefly
          Process.sleep(100)
          # Then crash
          raise "Optimizer crashed!"
        end)

      # Wait for crash
      Process.sleep(200)

      # Lock should be cleaned up, new optimizer can acquire
      {:ok, :lock_acquired} =
        OptimizerCoordinator.acquire_lock(
          var_id,
          "new_opt",
          self()
        )
    end
  end

  describe "access control" do
    test "enforces variable permissions" do
      owner_session = "owner_session"
      other_session = "other_session"

      variable = %{
        id: "var_123",
        metadata: %{owner_session: owner_session},
        access_rules: [
          %{session_pattern: :any, permissions: [:read]},
          %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
        ]
      }

      # Owner has all permissions
      assert :ok = AccessControl.check_permission(variable, owner_session, :write)
      assert :ok = AccessControl.check_permission(variable, owner_session, :optimize)

      # Others can only read
      assert :ok = AccessControl.check_permission(variable, other_session, :read)

      assert {:error, :access_denied} =
               AccessControl.check_permission(variable, other_session, :write)

      # Admin can do more
      assert :ok = AccessControl.check_permission(variable, "admin_user", :write)
      assert :ok = AccessControl.check_permission(variable, "admin_user", :optimize)
    end

    test "validates access rules" do
      valid_rules = [
        %{session_pattern: :any, permissions: [:read]},
        %{session_pattern: "test_*", permissions: [:read, :write]}
      ]

      assert :ok = AccessControl.validate_rules(valid_rules)

      invalid_rules = [
        %{session_pattern: :any, permissions: [:invalid_perm]}
      ]

      assert {:error, _} = AccessControl.validate_rules(invalid_rules)
    end
  end

  describe "performance analytics" do
    setup do
      {:ok, _} = SeedCompat.started(Analytics.start_link(aggregation_interval: 100))
      :ok
    end

    test "tracks metrics via telemetry" do
      # Emit some events
      :telemetry.execute(
        [:dspex, :bridge, :variable, :read],
        %{duration_us: 150},
        %{session_id: "test", variable_id: "var1"}
      )

      :telemetry.execute(
        [:dspex, :bridge, :variable, :write],
        %{duration_us: 500},
        %{session_id: "test", variable_id: "var1"}
      )

      :telemetry.execute(
        [:dspex, :bridge, :cache, :hit],
        %{},
        %{session_id: "test", variable_id: "var1"}
      )

      # Give time for processing
      Process.sleep(50)

      # Check dashboard
      dashboard = Analytics.get_dashboard()

      assert dashboard.last_minute.variable_reads == 1
      assert dashboard.last_minute.variable_writes == 1
      assert dashboard.last_minute.avg_read_latency == 150.0
      assert dashboard.last_minute.avg_write_latency == 500.0
    end
  end

  describe "circuit breaker recovery" do
    test "opens circuit after repeated failures" do
      # This would test the circuit breaker implementation
      # Simplified for example
      assert true
    end
  end

  # Helper functions

  defp index_of(list, item) do
    Enum.find_index(list, &(&1 == item))
  end
end
