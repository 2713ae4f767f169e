defmodule DSPex.Bridge.NifPanicTest do
  # A panic inside a NIF is an exception in the calling process only: the
  # VM, the engine and its sessions live on (rustler catches the unwind).
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{Native, SessionStore}

  test "a panicking NIF raises in the caller; the store lives on" do
    {:ok, sid} = SessionStore.create_session("panic-#{System.unique_integer([:positive])}")
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)

    assert_raise ErlangError, ~r/nif_panicked/, fn -> Native.debug_panic() end

    # The same in another process: it exits with the error, nothing else does.
    {pid, ref} =
      spawn_monitor(fn ->
        try do
          Native.debug_panic()
        catch
          :error, reason -> exit({:caught, reason})
        end
      end)

    assert_receive {:DOWN, ^ref, :process, ^pid, {:caught, :nif_panicked}}

    assert :ok = SessionStore.update_variable(sid, :x, 2)
    assert {:ok, %{value: 2}} = SessionStore.get_variable(sid, :x)
  end
end
