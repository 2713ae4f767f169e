defmodule DSPex.Bridge.OptionsTest do
  # One options policy for every public function of the library
  # (DSPex.Bridge.Options): options that are not a keyword list, carry
  # unknown keys or a key twice are an error tuple, never an exception, and
  # change nothing.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{
    AccessControl,
    CircuitBreaker,
    DependencyManager,
    OptimizerCoordinator,
    RetryPolicy,
    SessionStore
  }

  alias DSPex.{Context, Variables}

  setup do
    sid = "opts_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    {:ok, snapshot} = SessionStore.export_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, ctx} = Context.start_link()
    {:ok, _} = Variables.defvariable(ctx, :v, :integer, 1)
    breaker = {__MODULE__, sid}
    :ok = CircuitBreaker.install(breaker)
    %{sid: sid, snapshot: snapshot, ctx: ctx, breaker: breaker}
  end

  # Every public non-bang function taking options, with `opts` in place.
  defp calls(%{sid: sid, snapshot: snapshot, ctx: ctx, breaker: breaker}) do
    key = "opts_key_#{sid}"
    new = "#{sid}_new"

    [
      create_session: &SessionStore.create_session(new, &1),
      get_session: &SessionStore.get_session(sid, &1),
      delete_session: &SessionStore.delete_session(sid, &1),
      get_session_diagnostics: &SessionStore.get_session_diagnostics(sid, &1),
      export_session: &SessionStore.export_session(sid, &1),
      import_session: &SessionStore.import_session(snapshot, &1),
      register_variable: &SessionStore.register_variable(sid, :y, :integer, 1, &1),
      get_variable: &SessionStore.get_variable(sid, :x, &1),
      update_variable: &SessionStore.update_variable(sid, :x, 2, %{}, &1),
      update_variables: &SessionStore.update_variables(sid, %{x: 2}, &1),
      get_variables: &SessionStore.get_variables(sid, [:x], &1),
      list_variables: &SessionStore.list_variables(sid, nil, &1),
      delete_variable: &SessionStore.delete_variable(sid, :x, &1),
      set_variable_permissions: &SessionStore.set_variable_permissions(sid, :x, [], &1),
      check_variable_access: &SessionStore.check_variable_access(sid, :x, "p", :read, &1),
      get_variable_history: &SessionStore.get_variable_history(sid, :x, 10, &1),
      rollback_variable: &SessionStore.rollback_variable(sid, :x, 0, &1),
      start_optimization: &SessionStore.start_optimization(sid, :x, self(), &1),
      stop_optimization: &SessionStore.stop_optimization(sid, :x, &1),
      audit_log: &AccessControl.audit_log(sid, &1),
      authorize: &AccessControl.authorize(sid, :x, :read, &1),
      authorize_session: &AccessControl.authorize_session(sid, :read, &1),
      acquire_lock: &OptimizerCoordinator.acquire_lock(key, "o", self(), &1),
      release_lock: &OptimizerCoordinator.release_lock(key, "o", &1),
      renew_lock: &OptimizerCoordinator.renew_lock(key, "o", &1),
      get_lock_info: &OptimizerCoordinator.get_lock_info(key, &1),
      context_start_link: &Context.start_link/1,
      defvariable: &Variables.defvariable(ctx, :w, :integer, 1, &1),
      set: &Variables.set(ctx, :v, 2, &1),
      update: &Variables.update(ctx, :v, fn v -> v + 1 end, &1),
      update_many: &Variables.update_many(ctx, %{v: 2}, &1),
      add_dependency: &DependencyManager.add_dependency(sid, :x, :y, :data, &1),
      get_dependencies: &DependencyManager.get_dependencies(sid, :x, &1),
      breaker_install: &CircuitBreaker.install(breaker, &1),
      breaker_call: &CircuitBreaker.call(breaker, fn -> :ok end, &1),
      breaker_record: &CircuitBreaker.record(breaker, :ok, &1),
      retry_new: &RetryPolicy.new/1,
      retry_run: &RetryPolicy.run(RetryPolicy.new(), fn -> :ok end, &1),
      retry_budget: &RetryPolicy.configure_budget({__MODULE__, sid}, &1)
    ]
  end

  test "options that are not a keyword list are {:bad_options, opts}", ctx do
    for {name, call} <- calls(ctx),
        bad <- [:not_a_list, %{principal: "p"}, [1], ["principal", "p"], [{"principal", "p"}]] do
      assert call.(bad) == {:error, {:invalid_argument, {:bad_options, bad}}},
             "#{name} with #{inspect(bad)}"
    end

    assert_unchanged(ctx.sid)
  end

  test "unknown keys are {:unknown_options, keys}: a misspelt principal is not ignored", ctx do
    for {name, call} <- calls(ctx) do
      assert call.(principle: "intruder", bogus: 1) ==
               {:error, {:invalid_argument, {:unknown_options, [:principle, :bogus]}}},
             "#{name}"
    end

    assert_unchanged(ctx.sid)
  end

  test "a key given twice is {:duplicate_options, keys}: which principal would it be?", ctx do
    # A key each function knows (else :principal).
    known = %{
      create_session: :ttl,
      import_session: :backend,
      check_variable_access: :context,
      context_start_link: :id,
      breaker_install: :timeout,
      breaker_call: :timeout,
      breaker_record: :duration_ms,
      retry_new: :max_attempts,
      retry_run: :deadline,
      retry_budget: :ratio
    }

    for {name, call} <- calls(ctx) do
      key = Map.get(known, name, :principal)

      assert call.([{key, nil}, {key, nil}]) ==
               {:error, {:invalid_argument, {:duplicate_options, [key]}}},
             "#{name}"
    end

    assert_unchanged(ctx.sid)
  end

  test "get_variable_value/4 answers the default for bad options", %{sid: sid} do
    assert SessionStore.get_variable_value(sid, :x, :dflt, :not_a_list) == :dflt
    assert SessionStore.get_variable_value(sid, :x, :dflt, principle: "intruder") == :dflt
    assert SessionStore.get_variable_value(sid, :x, :dflt, []) == 1
  end

  defp assert_unchanged(sid) do
    assert {:ok, %{variable_count: 1}} = SessionStore.get_session(sid)
    assert {:ok, %{value: 1, version: 0}} = SessionStore.get_variable(sid, :x)
    assert {:error, :session_not_found} = SessionStore.get_session("#{sid}_new")
    assert {:error, :not_optimizing} = SessionStore.stop_optimization(sid, :x)
  end
end
