defmodule DSPex.Bridge.Conformance.IntegerRangeCases do
  @moduledoc """
  Integers out of range, for every integer argument of the API: each
  backend refuses them with the same error and changes nothing (the port
  once truncated them to 64 bits, so `expected_version: 2**64 + 1` was taken
  as 1). Run by `DSPex.Bridge.IntegerRangeTest`.

  The ranges are the NIF's: values, ttl, history and audit sizes and rate
  limits are 64-bit signed; versions (`expected_version:`, rollbacks) 64-bit
  unsigned; history and audit log limits 63-bit.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [unique_id: 1]

  alias DSPex.Bridge.{AccessControl, SessionStore}

  @u64_max 2 ** 64 - 1
  @beyond_u64 [2 ** 64, 2 ** 64 + 1, 2 ** 65 + 2, 2 ** 200]
  @beyond_i64 [2 ** 63, 2 ** 63 + 1 | @beyond_u64]
  @below_i64 [-(2 ** 63) - 1, -(2 ** 200)]

  defp with_versions(sid) do
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
    :ok = SessionStore.update_variable(sid, :x, 1)
    :ok = SessionStore.update_variable(sid, :x, 2)
    {:ok, %{version: 2}} = SessionStore.get_variable(sid, :x)
  end

  defp unchanged(sid) do
    assert {:ok, %{version: 2, value: 2}} = SessionStore.get_variable(sid, :x)

    assert {:ok, [%{version: 1}, %{version: 0}]} = SessionStore.get_variable_history(sid, :x)
  end

  conformance "values: beyond 64 signed bits are refused, never truncated", %{sid: sid} do
    with_versions(sid)

    for n <- @beyond_i64 ++ @below_i64 do
      assert {:error, {:invalid_value, :integer_out_of_range}} =
               SessionStore.update_variable(sid, :x, n),
             inspect(n)

      assert {:error, {:invalid_value, :integer_out_of_range}} =
               SessionStore.update_variable(sid, :x, 3, %{count: n})

      assert {:error, {:invalid_value, :integer_out_of_range}} =
               SessionStore.register_variable(sid, :y, :integer, n)

      assert {:error, {:invalid_value, :integer_out_of_range}} =
               SessionStore.register_variable(sid, :y, :integer, 1, constraints: %{max: n})
    end

    unchanged(sid)
    assert {:error, :not_found} = SessionStore.get_variable(sid, :y)
    # The edges of the range are accepted.
    assert :ok = SessionStore.update_variable(sid, :x, 2 ** 63 - 1)
    assert :ok = SessionStore.update_variable(sid, :x, -(2 ** 63))
    assert SessionStore.get_variable_value(sid, :x) == -(2 ** 63)
  end

  conformance "expected_version: beyond 64 unsigned bits is refused, never truncated",
              %{sid: sid} do
    with_versions(sid)

    for n <- @beyond_u64 ++ [-1] do
      reason = {:invalid_argument, :expected_non_negative_integer}
      # 2**64 + 2 would match version 2 if cut to 64 bits.
      assert {:error, ^reason} = SessionStore.update_variable(sid, :x, 9, %{expected_version: n}),
             inspect(n)

      assert {:error, ^reason} =
               SessionStore.update_variable(sid, :x, 9, %{}, expected_version: n)

      assert {:error, ^reason} =
               SessionStore.update_variables(sid, [{:x, 9, %{expected_version: n}}])

      assert {:error, ^reason} =
               SessionStore.update_variables(sid, [{:x, 9, %{expected_version: n}}], atomic: true)
    end

    unchanged(sid)

    assert {:error, {:version_mismatch, 2}} =
             SessionStore.update_variable(sid, :x, 9, %{expected_version: @u64_max})

    assert :ok = SessionStore.update_variable(sid, :x, 3, %{expected_version: 2})
  end

  conformance "rollback_variable/3: a version beyond 64 unsigned bits is not found",
              %{sid: sid} do
    with_versions(sid)

    # 2**64 and 2**200 would roll back to version 0 if cut to 64 bits.
    for n <- @beyond_u64 ++ [@u64_max, -1] do
      assert {:error, :version_not_found} = SessionStore.rollback_variable(sid, :x, n),
             inspect(n)
    end

    unchanged(sid)
    assert :ok = SessionStore.rollback_variable(sid, :x, 0)
    assert {:ok, %{version: 3, value: 0}} = SessionStore.get_variable(sid, :x)
  end

  conformance "history and audit limits: beyond 63 bits are refused", %{sid: sid} do
    with_versions(sid)

    for n <- @beyond_i64 do
      assert {:error, {:invalid_argument, :bad_limit}} =
               SessionStore.get_variable_history(sid, :x, n),
             inspect(n)

      assert AccessControl.audit_log(sid, limit: n) == []
    end

    assert {:ok, [_, _]} = SessionStore.get_variable_history(sid, :x, 2 ** 63 - 1)
    assert {:ok, [%{version: 1}]} = SessionStore.get_variable_history(sid, :x, 1)
  end

  conformance "create_session/2: ttl, history, audit size and rate limit beyond 64 bits",
              %{backend: b} do
    for n <- @beyond_i64 do
      for opts <- [
            [ttl: n],
            [max_history: n],
            [audit_size: n],
            [rate_limit: {n, 1}],
            [rate_limit: {1, n}],
            [metadata: %{n: n}]
          ] do
        id = unique_id(b)

        assert {:error, {:invalid_value, :integer_out_of_range}} =
                 SessionStore.create_session(id, [backend: b] ++ opts),
               inspect(opts)

        assert {:error, :session_not_found} = SessionStore.get_session(id)
      end
    end
  end
end
