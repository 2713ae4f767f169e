defmodule DSPex.Bridge.Gateway.Holders do
  @moduledoc false
  # A gRPC client's optimizer lock needs a live holder process on the BEAM
  # (the coordinator monitors holders): one small process per optimization,
  # started by StartOptimization, ended by StopOptimization or when the lock
  # is gone (its lease expired, it was preempted or released elsewhere).
  use GenServer

  alias DSPex.Bridge.{OptimizerCoordinator, SessionStore}

  @registry DSPex.Bridge.Gateway.HolderRegistry
  @supervisor DSPex.Bridge.Gateway.HolderSupervisor
  @check_ms 10_000

  def start(sid, ident, opts) do
    spec = %{
      id: make_ref(),
      restart: :temporary,
      start: {GenServer, :start_link, [__MODULE__, {sid, ident, opts}]}
    }

    case DynamicSupervisor.start_child(@supervisor, spec) do
      {:ok, pid} -> GenServer.call(pid, :result)
      {:error, {:shutdown, {:error, _} = error}} -> error
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, _ -> {:error, :not_running}
  end

  def stop(sid, ident, opts) do
    principal = Keyword.take(opts, [:principal])
    info = OptimizerCoordinator.get_lock_info(ident, [session_id: sid] ++ principal)

    with :ok <- SessionStore.stop_optimization(sid, ident, opts) do
      with {:ok, %{optimizer_id: oid}} <- info,
           [{pid, _}] <- Registry.lookup(@registry, {sid, to_string(oid)}) do
        send(pid, :stop)
      end

      :ok
    end
  end

  @impl true
  def init({sid, ident, opts}) do
    case SessionStore.start_optimization(sid, ident, self(), opts) do
      {:ok, %{optimizer_id: oid} = result} ->
        Registry.register(@registry, {sid, oid}, nil)
        Process.send_after(self(), :check, @check_ms)
        {:ok, %{sid: sid, ident: ident, result: result}}

      {:error, _} = error ->
        {:stop, {:shutdown, error}}
    end
  end

  @impl true
  def handle_call(:result, _from, state), do: {:reply, {:ok, state.result}, state}

  @impl true
  def handle_info(:stop, state), do: {:stop, :normal, state}
  def handle_info({:optimization_preempted, _}, state), do: {:stop, :normal, state}

  def handle_info(:check, state) do
    case OptimizerCoordinator.get_lock_info(state.ident, session_id: state.sid) do
      {:ok, %{pid: pid}} when pid == self() ->
        Process.send_after(self(), :check, @check_ms)
        {:noreply, state}

      {:error, reason} when reason in [:rate_limited, :overloaded, :backend_unavailable] ->
        Process.send_after(self(), :check, @check_ms)
        {:noreply, state}

      _ ->
        {:stop, :normal, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}
end
