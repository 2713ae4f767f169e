defmodule DSPex.Bridge.OptimizerCoordinator.Args do
  @moduledoc false
  # The coordinator's arguments: its option lists, and the checks of
  # optimizer ids, conflict modes, timeouts, leases, pids and keys.

  @acquire_opts [:timeout, :conflict_resolution, :session_id, :principal, :lease]
  @start_opts [:optimizer_id, :timeout, :conflict_resolution, :principal, :lease]

  # Session-variable locks live under `{:dspex_session, session_id, var_id}`,
  # a form no raw key may take, so no raw key names one.
  @session :dspex_session

  @doc false
  def acquire_opts, do: @acquire_opts

  @doc false
  def start_opts, do: @start_opts

  @doc false
  def session_tag, do: @session

  @doc false
  defguard reserved?(key)
           when is_tuple(key) and tuple_size(key) == 3 and elem(key, 0) == @session

  def reserved(key), do: {:error, {:invalid_argument, {:reserved_key, key}}}

  def optimizer(id) when is_binary(id) and byte_size(id) in 1..255, do: {:ok, id}

  def optimizer(id) when is_atom(id) and id not in [nil, true, false],
    do: optimizer(Atom.to_string(id))

  def optimizer(id), do: {:error, {:invalid_argument, {:optimizer_id, id}}}

  def conflict(mode) when mode in [:wait, :abort, :preempt], do: {:ok, mode}
  def conflict(mode), do: {:error, {:invalid_argument, {:conflict_resolution, mode}}}

  def timeout(:infinity), do: {:ok, nil}
  def timeout(ms) when is_integer(ms) and ms >= 0, do: {:ok, ms}
  def timeout(ms), do: {:error, {:invalid_argument, {:timeout, ms}}}

  def lease(nil), do: {:ok, nil}
  def lease(ms) when is_integer(ms) and ms > 0, do: {:ok, ms}
  def lease(ms), do: {:error, {:invalid_argument, {:lease, ms}}}

  def check_pid(pid) when is_pid(pid) and node(pid) == node(), do: :ok
  def check_pid(pid), do: {:error, {:invalid_argument, {:pid, pid}}}

  def new_optimizer_id, do: "opt_#{System.unique_integer([:positive])}"
end
