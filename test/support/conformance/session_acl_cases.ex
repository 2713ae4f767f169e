defmodule DSPex.Bridge.Conformance.SessionAclCases do
  @moduledoc """
  The checks with no variable rules behind them, run against each backend
  by `DSPex.Bridge.AccessControlTest`: session-level operations are
  reserved to the session itself, and session-variable locks are reachable
  only through `session_id:`, checked for the principal.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [new_session: 1]

  alias DSPex.Bridge.{AccessControl, OptimizerCoordinator, SessionStore}
  alias DSPex.TelemetryHelper

  @denied [:dspex, :bridge, :access, :denied]

  defp private_variable(ctx) do
    sid = new_session(ctx)
    {:ok, id} = SessionStore.register_variable(sid, :secret, :integer, 7)
    {sid, id}
  end

  conformance "session-level operations refuse another principal, audited and reported", ctx do
    {sid, _id} = private_variable(ctx)
    ref = TelemetryHelper.attach([@denied])
    as = [principal: "intruder"]
    denied = {:error, :access_denied}

    assert ^denied = SessionStore.get_session(sid, as)
    assert ^denied = SessionStore.get_session_diagnostics(sid, as)
    assert ^denied = SessionStore.export_session(sid, as)
    assert ^denied = AccessControl.audit_log(sid, as)
    assert ^denied = SessionStore.delete_session(sid, as)

    for permission <- [:read, :read, :read, :read, :write] do
      assert_receive {@denied, ^ref, _,
                      %{
                        session_id: ^sid,
                        variable: nil,
                        principal: "intruder",
                        permission: ^permission
                      }}
    end

    log = AccessControl.audit_log(sid)

    assert [:write, :read, :read, :read, :read] ==
             for(
               %{event: :denied, principal: "intruder", variable: nil} = e <- log,
               do: e.permission
             )

    # Nothing was deleted; the session itself, by default or by name, may.
    assert {:ok, %{id: ^sid, variable_count: 1}} = SessionStore.get_session(sid)
    assert {:ok, %{id: ^sid}} = SessionStore.get_session(sid, principal: sid)
    assert {:ok, %{variables: [%{name: :secret}]}} = SessionStore.get_session_diagnostics(sid)

    assert {:ok, %{variables: [_]}} = SessionStore.get_session_diagnostics(sid, principal: sid)

    assert {:ok, snapshot} = SessionStore.export_session(sid, principal: sid)
    assert is_binary(snapshot)
    assert [_ | _] = AccessControl.audit_log(sid, principal: sid)
    assert :ok = SessionStore.delete_session(sid, principal: sid)
    assert {:error, :session_not_found} = SessionStore.get_session(sid)
  end

  conformance "list_variables(sid, principal: p): options as the second argument", ctx do
    {sid, _id} = private_variable(ctx)

    {:ok, _} =
      SessionStore.register_variable(sid, :open, :integer, 1,
        access_rules: [%{session_pattern: "reader_*", permissions: [:read]}]
      )

    assert {:ok, [%{name: :open}]} = SessionStore.list_variables(sid, principal: "reader_1")
    assert {:ok, [%{name: :open}]} = SessionStore.list_variables(sid, nil, principal: "reader_1")
    assert {:ok, []} = SessionStore.list_variables(sid, principal: "intruder")
    assert {:ok, [%{name: :open}, %{name: :secret}]} = SessionStore.list_variables(sid, [])
    assert {:ok, [%{name: :secret}]} = SessionStore.list_variables(sid, "sec*")

    assert {:error, {:invalid_argument, {:unknown_options, [:principle]}}} =
             SessionStore.list_variables(sid, principle: "reader_1")
  end

  conformance "session-level operations: unknown sessions and bad principals", ctx do
    sid = new_session(ctx)
    as = [principal: "intruder"]

    assert {:error, :session_not_found} = SessionStore.get_session("conf_none", as)
    assert {:error, :session_not_found} = SessionStore.export_session("conf_none", as)
    assert AccessControl.audit_log("conf_none", as) == []

    for bad <- [42, "", String.duplicate("p", 256)] do
      assert {:error, {:invalid_argument, :bad_principal}} =
               SessionStore.get_session(sid, principal: bad)
    end

    assert {:error, {:invalid_argument, {:unknown_options, [:principle]}}} =
             SessionStore.export_session(sid, principle: "intruder")
  end

  conformance "a raw {session, var} key is not the session variable's lock", ctx do
    {sid, id} = private_variable(ctx)

    {:ok, %{optimizer_id: o, token: token}} =
      SessionStore.start_optimization(sid, :secret, self())

    # Neither the holder nor its token can be read through a raw key.
    for raw <- [{sid, id}, {sid, "secret"}, {sid, :secret}, id] do
      assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(raw)
      assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(raw, o)
      assert {:error, :not_lock_owner} = OptimizerCoordinator.renew_lock(raw, o)
    end

    # The lock (and the fence of its writes) is still the optimizer's.
    assert {:ok, %{optimizer_id: ^o, token: ^token}} =
             OptimizerCoordinator.get_lock_info(:secret, session_id: sid)

    assert {:error, {:already_optimizing, %{optimizer_id: ^o}}} =
             SessionStore.start_optimization(sid, :secret, self())

    assert :ok = SessionStore.stop_optimization(sid, :secret, optimizer_id: o)
  end

  conformance "a raw key cannot squat a session variable's lock", ctx do
    {sid, id} = private_variable(ctx)

    for raw <- [{sid, id}, {sid, "secret"}] do
      assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(raw, "squatter", self())
    end

    assert {:ok, %{optimizer_id: o}} = SessionStore.start_optimization(sid, :secret, self())
    assert :ok = SessionStore.stop_optimization(sid, :secret, optimizer_id: o)

    for raw <- [{sid, id}, {sid, "secret"}],
        do: :ok = OptimizerCoordinator.release_lock(raw, "squatter")
  end

  conformance "the session-lock key form is refused as a raw key", ctx do
    {sid, id} = private_variable(ctx)
    {:ok, %{optimizer_id: o}} = SessionStore.start_optimization(sid, :secret, self())
    key = {:dspex_session, sid, id}
    reserved = {:error, {:invalid_argument, {:reserved_key, key}}}

    assert ^reserved = OptimizerCoordinator.acquire_lock(key, "squatter", self())
    assert ^reserved = OptimizerCoordinator.acquire_lock(key, "squatter", self(), timeout: 0)
    assert ^reserved = OptimizerCoordinator.get_lock_info(key)
    assert ^reserved = OptimizerCoordinator.release_lock(key, o)
    assert ^reserved = OptimizerCoordinator.release_lock(key, o, [])
    assert ^reserved = OptimizerCoordinator.renew_lock(key, o)

    assert {:ok, %{optimizer_id: ^o}} =
             OptimizerCoordinator.get_lock_info(:secret, session_id: sid)

    assert :ok = SessionStore.stop_optimization(sid, :secret, optimizer_id: o)
  end

  conformance "every session-lock operation checks the principal", ctx do
    {sid, _id} = private_variable(ctx)

    :ok =
      SessionStore.set_variable_permissions(sid, :secret, [
        %{session_pattern: "tuner_*", permissions: [:optimize]},
        %{session_pattern: "viewer_*", permissions: [:read]}
      ])

    {:ok, %{optimizer_id: o}} = SessionStore.start_optimization(sid, :secret, self())
    ref = TelemetryHelper.attach([@denied])
    on = fn principal -> [session_id: sid, principal: principal] end
    denied = {:error, :access_denied}

    assert ^denied = OptimizerCoordinator.get_lock_info(:secret, on.("stranger"))

    assert_receive {@denied, ^ref, _,
                    %{session_id: ^sid, principal: "stranger", permission: :read}}

    assert ^denied = OptimizerCoordinator.release_lock(:secret, o, on.("viewer_1"))

    assert_receive {@denied, ^ref, _,
                    %{session_id: ^sid, principal: "viewer_1", permission: :optimize}}

    assert ^denied = OptimizerCoordinator.renew_lock(:secret, o, on.("viewer_1"))

    assert_receive {@denied, ^ref, _,
                    %{session_id: ^sid, principal: "viewer_1", permission: :optimize}}

    assert ^denied = OptimizerCoordinator.acquire_lock(:secret, "o2", self(), on.("viewer_1"))

    assert_receive {@denied, ^ref, _,
                    %{session_id: ^sid, principal: "viewer_1", permission: :optimize}}

    assert [
             %{principal: "viewer_1", permission: :optimize},
             %{principal: "viewer_1", permission: :optimize},
             %{principal: "viewer_1", permission: :optimize},
             %{principal: "stranger", permission: :read} | _
           ] = AccessControl.audit_log(sid, event: :denied)

    # What a rule grants is what is checked: :read to look, :optimize to act.
    assert {:ok, %{optimizer_id: ^o}} =
             OptimizerCoordinator.get_lock_info(:secret, on.("viewer_1"))

    assert {:error, :not_lock_owner} =
             OptimizerCoordinator.release_lock(:secret, "someone", on.("tuner_1"))

    assert :ok = OptimizerCoordinator.release_lock(:secret, o, on.("tuner_1"))

    assert {:ok, :lock_acquired} =
             OptimizerCoordinator.acquire_lock(:secret, "o2", self(), on.("tuner_1"))

    assert {:ok, _token} = OptimizerCoordinator.renew_lock(:secret, "o2", on.("tuner_1"))
    assert :ok = OptimizerCoordinator.release_lock(:secret, "o2", on.("tuner_1"))
  end
end
