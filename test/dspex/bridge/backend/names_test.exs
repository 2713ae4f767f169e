defmodule DSPex.Bridge.Backend.NamesTest do
  # One operation, one name: the core's `Operation::NAME` is the NIF's name
  # (its stub in DSPex.Bridge.Native), the Backend callback and what every
  # backend implements.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.Backend

  # Commands that are no callback: `var_fence` is sent by the port server
  # itself when the lock table moves a port session's fence.
  @internal ~w(var_fence)

  defp names(module), do: module.__info__(:functions) |> Keyword.keys() |> MapSet.new()

  test "every command is a callback, a NIF and a function of each backend, by its core name" do
    commands =
      for {name, _writes} <- DSPex.Bridge.Native.command_catalog(),
          name not in @internal,
          do: String.to_existing_atom(name)

    assert length(commands) > 30
    callbacks = Backend.behaviour_info(:callbacks) |> Keyword.keys() |> MapSet.new()

    for module <- [Backend.Native, Backend.Port, Backend.Router] do
      assert commands -- MapSet.to_list(names(module)) == [], inspect(module)
    end

    assert commands -- MapSet.to_list(callbacks) == []
    # The NIF: every command the NIF serves has its core name.
    nif = names(DSPex.Bridge.Native)
    assert Enum.reject(commands, &MapSet.member?(nif, &1)) == []
  end

  test "every callback is a command" do
    commands = for {name, _} <- DSPex.Bridge.Native.command_catalog(), do: name

    for {callback, _arity} <- Backend.behaviour_info(:callbacks),
        do: assert(Atom.to_string(callback) in commands, inspect(callback))
  end
end
