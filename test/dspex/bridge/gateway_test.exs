defmodule DSPex.Bridge.GatewayTest do
  # The gateway is a singleton (registered names): not async.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Gateway
  alias DSPex.Bridge.Gateway.{Handler, Tokens, Wire}
  alias DSPex.TelemetryEmitters.Gateway, as: Run

  describe "issue_token/2 and revoke_token/1" do
    test "without a running gateway" do
      assert Gateway.issue_token("s1") == {:error, :not_running}
      assert Gateway.revoke_token("whatever") == :ok
    end

    test "verify, sessions, expiry, revocation" do
      Run.with_gateway(fn ->
        {:ok, t} = Gateway.issue_token("s1", sessions: ["s1", "team-*"], ttl: 60_000)
        assert {:ok, auth} = Tokens.verify(t)
        assert auth.principal == "s1"
        assert Tokens.allows?(auth, "s1")
        assert Tokens.allows?(auth, "team-7")
        refute Tokens.allows?(auth, "xteam-7")
        refute Tokens.allows?(auth, "s2")

        {:ok, short} = Gateway.issue_token("s1", ttl: 1)
        Process.sleep(5)
        assert Tokens.verify(short) == {:error, :expired}

        assert :ok = Gateway.revoke_token(t)
        assert Tokens.verify(t) == {:error, :unauthenticated}
        assert Tokens.verify("nope") == {:error, :unauthenticated}
        assert Tokens.verify(123) == {:error, :unauthenticated}
      end)
    end

    test "bad arguments" do
      Run.with_gateway(fn ->
        assert {:error, {:invalid_argument, _}} = Gateway.issue_token("")
        assert {:error, {:invalid_argument, _}} = Gateway.issue_token(:admin)
        assert {:error, {:invalid_argument, _}} = Gateway.issue_token("s", ttl: -1)
        assert {:error, {:invalid_argument, _}} = Gateway.issue_token("s", sessions: "s")
        assert {:error, {:invalid_argument, _}} = Gateway.issue_token("s", bogus: 1)
      end)
    end
  end

  describe "the call context" do
    test "missing, malformed and unknown tokens are unauthenticated" do
      Run.with_gateway(fn ->
        config = Gateway.config([])

        for meta <- [%{}, %{"authorization" => "Basic x"}, %{"authorization" => "Bearer nope"}] do
          assert {:status, :unauthenticated, _, "unauthenticated"} = Handler.context(meta, config)
        end

        {:ok, t} = Gateway.issue_token("s1")

        assert {:ok, %{auth: %{principal: "s1"}}} =
                 Handler.context(%{"authorization" => "Bearer " <> t}, config)
      end)
    end

    test "a token's session scope is enforced before any call" do
      Run.with_gateway(fn ->
        {:ok, t} = Gateway.issue_token("s1")
        {:ok, ctx} = Handler.context(%{"authorization" => "Bearer " <> t}, Gateway.config([]))

        assert {:status, :permission_denied, _, "access_denied"} =
                 Handler.call(
                   "GetVariable",
                   %{"session_id" => "other", "variable_identifier" => "x"},
                   ctx
                 )
      end)
    end
  end

  describe "config/1" do
    test "auth: :none only on loopback" do
      assert_raise ArgumentError, ~r/loopback/, fn ->
        Gateway.config(auth: :none, ip: {0, 0, 0, 0})
      end

      assert %{auth: :none} = Gateway.config(auth: :none, ip: "127.0.0.1")
      assert_raise ArgumentError, fn -> Gateway.config(port: 70_000) end
      assert_raise ArgumentError, fn -> Gateway.config(max_in_flight: 0) end
      assert_raise ArgumentError, fn -> Gateway.config(tls: [certfile: "x"]) end
    end
  end

  describe "bad frames from the gateway program" do
    test "are ignored; the server keeps serving" do
      Run.with_gateway(fn ->
        pid = Process.whereis(Gateway)
        state = :sys.get_state(pid)

        for frame <- [
              <<0xC1>>,
              <<0x91, 0x01>>,
              <<131, 104, 1>>,
              # A new atom is refused (binary_to_term/2 with :safe).
              <<131, 119, 9, "never_atm">>,
              :erlang.term_to_binary(["call", "x"]),
              :erlang.term_to_binary(["credit", 99, 1]),
              :erlang.term_to_binary({:call, 1})
            ] do
          send(pid, {state.port, {:data, frame}})
        end

        assert {:ok, _} = Gateway.port()
        assert Process.whereis(Gateway) == pid
      end)
    end
  end

  describe "Wire" do
    test "values in: JSON, raw little-endian, pickles refused, non-finite refused" do
      assert Wire.decode_value(%{
               "type_url" => "type.googleapis.com/snakepit.float",
               "json" => 0.5
             }) ==
               {:ok, 0.5}

      bin = <<1.5::little-float-64, 2.5::little-float-64>>
      header = %{"encoding" => "raw-le", "dtype" => "float64", "shape" => [2]}

      assert Wire.decode_value(
               %{"type_url" => "t/snakepit.embedding.binary", "json" => header},
               bin
             ) ==
               {:ok, [1.5, 2.5]}

      assert {:error, {:invalid_value, msg}} =
               Wire.decode_value(
                 %{"type_url" => "t/snakepit.embedding.binary", "json" => %{"shape" => [2]}},
                 bin
               )

      assert msg =~ "pickle"

      assert {:error, {:invalid_value, _}} =
               Wire.decode_value(
                 %{"type_url" => "t/snakepit.embedding.binary", "json" => header},
                 "abc"
               )

      assert {:error, {:invalid_value, _}} =
               Wire.decode_value(%{"type_url" => "t/snakepit.float", "json" => "NaN"})

      assert Wire.decode_value(%{"type_url" => "t/snakepit.string", "json" => "NaN"}) ==
               {:ok, "NaN"}

      assert {:error, {:invalid_value, _}} = Wire.decode_value(%{"type_url" => "bogus"})
      assert {:error, {:invalid_value, _}} = Wire.decode_value(nil)

      assert {:error, {:invalid_value, _}} =
               Wire.decode_value(%{"type_url" => "t/snakepit.float", "value" => <<0x80>>})
    end

    test "error texts start with the reason's name" do
      assert Wire.reason_text({:version_mismatch, 3}) == "version_mismatch: current_version=3"
      assert Wire.reason_text(:access_denied) == "access_denied"
      assert Wire.status_of(:not_found) == :not_found
      assert Wire.status_of({:invalid_value, "x"}) == :invalid_argument
      assert Wire.status_of(:rate_limited) == :resource_exhausted
    end
  end
end
