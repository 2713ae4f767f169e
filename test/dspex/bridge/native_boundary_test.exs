defmodule DSPex.Bridge.NativeBoundaryTest do
  @moduledoc """
  The NIF boundary under garbage: every NIF, called with every mix of hostile
  arguments, returns a term or raises in the caller; the VM, the store and
  other sessions carry on.
  """
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{Native, SessionStore}

  @garbage [
    nil,
    :atom,
    -1,
    Integer.pow(2, 80),
    1.5,
    "",
    "bench",
    <<0xFF, 0xFE>>,
    [1 | 2],
    {1, 2, 3},
    %{a: [1, %{b: {2}}]},
    [:x, "y"],
    {:ref}
  ]

  test "no NIF crashes the VM on hostile arguments" do
    sid = "boundary_#{System.unique_integer([:positive])}"
    {:ok, _} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :keep, :integer, 42)
    args_pool = [sid, self(), make_ref(), fn -> :ok end | @garbage]
    :rand.seed(:exsss, {1, 2, 3})

    nifs =
      Native.__info__(:functions)
      # Not fuzzed: the loader, the calls that drop other tests' sessions,
      # and the ones naming the process the engine reports to.
      |> Enum.reject(fn {name, _} ->
        name in [:load_nif, :session_sweep, :session_delete, :lock_listen, :log_subscribe]
      end)

    for {name, arity} <- nifs, _round <- 1..200 do
      args = for _ <- 1..arity//1, do: Enum.random(args_pool)

      try do
        apply(Native, name, args)
      rescue
        ArgumentError -> :ok
        ErlangError -> :ok
      end
    end

    assert SessionStore.get_variable_value(sid, :keep) == 42
    SessionStore.delete_session(sid)
  end
end
