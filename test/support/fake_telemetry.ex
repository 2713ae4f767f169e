defmodule DSPex.FakeTelemetry do
  @moduledoc """
  A stand-in for the `:telemetry` application (not on this machine), built
  at test time: an Erlang module `telemetry` with `attach/4`,
  `attach_many/4`, `detach/1` and `execute/3`, and an `.app` whose start
  creates the handler table. Like the real one, attaching before the
  application started exits (`noproc`).

      ebin = DSPex.FakeTelemetry.build!(tmp_dir)   # tmp_dir/telemetry-1.0.0/ebin
  """

  @source ~S"""
  -module(telemetry).
  -behaviour(application).
  -export([start/2, stop/1, attach/4, attach_many/4, detach/1, execute/3, handlers/0]).

  start(_Type, _Args) ->
      Parent = self(),
      Pid = spawn_link(fun() ->
          ets:new(telemetry_fake_handlers, [named_table, public, bag]),
          Parent ! {self(), ready},
          receive stop -> ok end
      end),
      receive {Pid, ready} -> {ok, Pid} end.

  stop(_State) -> ok.

  table() ->
      case ets:whereis(telemetry_fake_handlers) of
          undefined -> exit({noproc, {gen_server, call, [telemetry_handler_table]}});
          _ -> telemetry_fake_handlers
      end.

  attach(Id, Event, Fun, Config) -> attach_many(Id, [Event], Fun, Config).

  attach_many(Id, Events, Fun, Config) ->
      T = table(),
      case ets:match_object(T, {'_', Id, '_', '_'}) of
          [] -> [ets:insert(T, {E, Id, Fun, Config}) || E <- Events], ok;
          _ -> {error, already_exists}
      end.

  detach(Id) ->
      T = table(),
      case ets:match_object(T, {'_', Id, '_', '_'}) of
          [] -> {error, not_found};
          _ -> ets:match_delete(T, {'_', Id, '_', '_'}), ok
      end.

  execute(Event, Measurements, Metadata) ->
      [Fun(Event, Measurements, Metadata, C) || {_, _, Fun, C} <- ets:lookup(table(), Event)],
      ok.

  %% For tests: {Id, Event} of every handler.
  handlers() -> [{Id, E} || {E, Id, _, _} <- ets:tab2list(table())].
  """

  @app ~S"""
  {application, telemetry,
   [{description, "fake telemetry for dspex_bridge tests"},
    {vsn, "1.0.0"},
    {modules, [telemetry]},
    {registered, []},
    {applications, [kernel, stdlib]},
    {mod, {telemetry, []}}]}.
  """

  @doc "The Erlang source of the fake `telemetry` module."
  def source, do: @source

  @doc "The `.app` of the fake application."
  def app_file, do: @app

  @doc "Compiles the fake application under `dir`; returns its ebin path."
  @spec build!(Path.t()) :: Path.t()
  def build!(dir) do
    ebin = Path.join(dir, "telemetry-1.0.0/ebin")
    src = Path.join(dir, "telemetry.erl")
    File.mkdir_p!(ebin)
    File.write!(src, @source)

    {:ok, :telemetry, beam} = :compile.file(String.to_charlist(src), [:binary, :return_errors])

    File.write!(Path.join(ebin, "telemetry.beam"), beam)
    File.write!(Path.join(ebin, "telemetry.app"), @app)
    ebin
  end
end
