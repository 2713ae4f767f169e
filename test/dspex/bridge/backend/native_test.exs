defmodule DSPex.Bridge.Backend.NativeTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.Backend.Native

  describe "init/1" do
    test "is idempotent with the limits the engine already has" do
      assert :ok = Native.init(Native.limits())
    end

    test "refuses to change the limits of the running engine" do
      limits = Native.limits()
      other = %{limits | max_history: limits.max_history + 1}

      assert {:error, {:invalid_argument, {:store_exists, ^limits}}} = Native.init(other)
      assert Native.limits() == limits
    end

    test "rejects garbage limits without touching the engine" do
      limits = Native.limits()

      assert {:error, {:invalid_argument, {:bad_limit, :max_history}}} =
               Native.init(%{max_history: -1})

      assert {:error, {:invalid_argument, :limits_must_be_a_map}} = Native.init(:garbage)
      assert Native.limits() == limits
    end
  end
end
