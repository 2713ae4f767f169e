defmodule DSPex.Bridge.IntegerRangeTest do
  # Out-of-range integers, once per backend (see
  # test/support/conformance/integer_range_cases.ex), and the two backend
  # modules asked the same questions directly, bypassing the Router.
  use ExUnit.Case, async: true

  use DSPex.Bridge.Conformance, cases: [DSPex.Bridge.Conformance.IntegerRangeCases]

  alias DSPex.Bridge.Backend.{Native, Port}
  alias DSPex.Bridge.SessionStore

  test "the NIF and the port give the same answer for every out-of-range integer argument" do
    sids =
      for {backend, mod} <- [nif: Native, port: Port], into: %{} do
        sid = "range_#{backend}_#{System.unique_integer([:positive])}"
        {:ok, ^sid} = SessionStore.create_session(sid, backend: backend)
        on_exit(fn -> SessionStore.delete_session(sid) end)
        {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
        :ok = SessionStore.update_variable(sid, :x, 1)
        {mod, sid}
      end

    calls = [
      fn m, s, n -> m.var_set(s, :x, 5, %{}, n, nil) end,
      fn m, s, n -> m.var_set_many(s, [{:x, 5, %{}, n}], false, nil) end,
      fn m, s, n -> m.var_set_many(s, [{:x, 5, %{}, n}], true, nil) end,
      fn m, s, n -> m.var_set(s, :x, n, %{}, nil, nil) end,
      fn m, s, n -> m.var_rollback(s, :x, n, nil) end,
      fn m, s, n -> m.var_history(s, :x, n, nil) end,
      fn m, s, n -> m.acl_audit_log(s, n) end
    ]

    for n <- [2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 64 + 1, 2 ** 200, -1],
        call <- calls do
      answers = for {mod, sid} <- sids, into: %{}, do: {mod, scrub(call.(mod, sid, n))}
      assert answers[Native] == answers[Port], "#{inspect(n)}: #{inspect(answers)}"
    end
  end

  # Timestamps differ between the two sessions; everything else must not.
  defp scrub(%{} = map),
    do: map |> Map.drop([:updated_at, :at]) |> Map.new(fn {k, v} -> {k, scrub(v)} end)

  defp scrub(list) when is_list(list), do: Enum.map(list, &scrub/1)
  defp scrub({a, b}), do: {scrub(a), scrub(b)}
  defp scrub(other), do: other
end
