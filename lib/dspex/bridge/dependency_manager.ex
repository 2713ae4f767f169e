defmodule DSPex.Bridge.DependencyManager do
  @moduledoc """
  Dependencies between a session's variables, and variables derived from
  others that stay up to date by themselves.

      {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.7)
      {:ok, _} = SessionStore.register_variable(sid, :top_p, :float, 0.9)

      {:ok, _} =
        DependencyManager.defderived(sid, :sampling, :string, [:temperature, :top_p],
          fn %{temperature: t, top_p: p} -> "t=\#{t} p=\#{p}" end)

      :ok = SessionStore.update_variable(sid, :temperature, 0.5)
      :ok = DependencyManager.await_propagation(sid)
      "t=0.5 p=0.9" = SessionStore.get_variable_value(sid, :sampling)

  ## Edges

  `add_dependency(sid, from, to)` records that `to` depends on `from`: a
  change to `from` must update `to`. Edges have a type (`:data` unless
  given; any atom). The graph lives in the session, in the Rust engine, so
  these calls go from the caller's process straight to it; concurrent
  callers are serialised by the engine, and the graph can never hold a cycle.

  Cycle detection is incremental: the engine maintains a topological order of
  the graph (Pearce–Kelly) and an insert only searches the part of the order
  between its two endpoints. An edge that would close a cycle is rejected
  with `{:error, :would_create_cycle}`, changes nothing, and emits
  `[:dspex, :bridge, :dependency, :cycle_detected]` with the offending path.
  Every walk is iterative, so a 100,000-long chain is as safe as a short one.

  Deleting a variable removes its edges. Snapshots (`export_session/1`)
  carry the edges; they do not carry compute functions (see below).

  ## Derived variables

  `defderived/6` registers a variable computed from others by a function of
  one argument, a map `%{input_name => value}` (names in the form you gave
  them). Each session with derived variables has one propagation worker.
  After a write to a variable with dependents, the worker recomputes the
  derived variables downstream of it, in topological order:

  - each derived variable is recomputed once per change, after all of its
    inputs, and sees their new values (no glitches);
  - writes that arrive while the worker is busy are coalesced into one pass;
  - the derived write's metadata names the writes that caused it:
    `%{derived: true, caused_by: [%{variable: :temperature, version: 4}]}`;
  - a compute function that raises (or returns a value the variable's type
    rejects) marks the variable stale, leaves its last value in place, emits
    `[:dspex, :bridge, :propagation, :exception]` and is recorded in the
    session's dead letters (`dead_letters/1`, `replay_dead_letters/1`);
    nothing else stops.

  Writing to a variable with no dependents costs nothing extra: sessions
  without derived variables have no worker, and the write path checks for
  one with a single `:persistent_term` lookup.

  Compute functions live in the worker (they are code, not data), so they
  are not part of snapshots: an imported session has its edges but must
  `defderived/6` again to recompute.

  ## Options common to every function

  - `principal:` the session on whose behalf the call is made (default: the
    session itself). Adding an edge needs read access to `from` and write
    access to `to`.
  """

  alias DSPex.Bridge.Telemetry
  alias DSPex.Bridge.DependencyManager.Propagator

  @type session_id :: String.t()
  @type ident :: atom | String.t()
  @type reason :: atom | {atom, term}
  @type compute_fun :: (%{ident => term} -> term)

  @formats [:dot, :mermaid]

  @doc """
  Adds `from -> to`: `to` depends on `from`. Adding an edge that exists
  replaces its type and returns `:ok`.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-deps")
      iex> for v <- [:a, :b, :c], do: {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, v, :integer, 0)
      iex> :ok = DSPex.Bridge.DependencyManager.add_dependency(sid, :a, :b)
      iex> :ok = DSPex.Bridge.DependencyManager.add_dependency(sid, :b, :c)
      iex> DSPex.Bridge.DependencyManager.add_dependency(sid, :c, :a)
      {:error, :would_create_cycle}
      iex> DSPex.Bridge.DependencyManager.add_dependency(sid, :a, :a)
      {:error, :self_dependency}
      iex> DSPex.Bridge.DependencyManager.add_dependency(sid, :a, :ghost)
      {:error, {:not_found, :ghost}}
  """
  @spec add_dependency(session_id, ident, ident, atom, keyword) :: :ok | {:error, reason}
  def add_dependency(session_id, from, to, type \\ :data, opts \\ [])

  def add_dependency(session_id, from, to, type, opts) when is_atom(type) and type != nil do
    principal = principal(opts)

    case backend().graph_add_edge(session_id, from, to, type, principal) do
      {:ok, true} ->
        Telemetry.execute(
          [:dspex, :bridge, :dependency, :added],
          %{system_time: System.system_time()},
          %{session_id: session_id, from: from, to: to, type: type}
        )

        :ok

      {:ok, false} ->
        :ok

      {:error, {:would_create_cycle, path}} ->
        Telemetry.execute(
          [:dspex, :bridge, :dependency, :cycle_detected],
          %{system_time: System.system_time(), path_length: length(path)},
          %{session_id: session_id, from: from, to: to, path: path}
        )

        {:error, :would_create_cycle}

      {:error, _} = error ->
        error
    end
  end

  def add_dependency(_session_id, _from, _to, type, _opts),
    do: {:error, {:invalid_argument, {:edge_type, type}}}

  @doc "Removes `from -> to`. Removing an edge that does not exist is `:ok`."
  @spec remove_dependency(session_id, ident, ident, keyword) :: :ok | {:error, reason}
  def remove_dependency(session_id, from, to, opts \\ []) do
    with {:ok, removed?} <- backend().graph_remove_edge(session_id, from, to, principal(opts)) do
      if removed?, do: removed(session_id, 1, %{from: from, to: to})
      :ok
    end
  end

  @doc """
  Removes every edge touching `var`, in both directions: what it depends on
  and what depends on it.
  """
  @spec clear_dependencies(session_id, ident, keyword) :: :ok | {:error, reason}
  def clear_dependencies(session_id, var, opts \\ []) do
    with {:ok, count} <- backend().graph_clear(session_id, var, principal(opts)) do
      if count > 0, do: removed(session_id, count, %{from: nil, to: nil, variable: var})
      :ok
    end
  end

  @doc """
  What `var` depends on, in topological order (what must be computed first,
  first). Direct dependencies unless `transitive: true`.
  """
  @spec get_dependencies(session_id, ident, keyword) :: {:ok, [ident]} | {:error, reason}
  def get_dependencies(session_id, var, opts \\ []) do
    opts = Keyword.validate!(opts, [:transitive, :principal])
    backend().graph_dependencies(session_id, var, opts[:transitive] == true, opts[:principal])
  end

  @doc """
  What depends on `var`, in topological order. Direct dependents unless
  `transitive: true`.
  """
  @spec get_dependents(session_id, ident, keyword) :: {:ok, [ident]} | {:error, reason}
  def get_dependents(session_id, var, opts \\ []) do
    opts = Keyword.validate!(opts, [:transitive, :principal])
    backend().graph_dependents(session_id, var, opts[:transitive] == true, opts[:principal])
  end

  @doc """
  The order in which to update after `changed` (one variable or a list)
  changed: the changed variables, then each transitive dependent once, in
  the maintained topological order.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-order")
      iex> for v <- [:a, :b, :c, :d], do: {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, v, :integer, 0)
      iex> for {f, t} <- [a: :b, a: :c, b: :d, c: :d], do: :ok = DSPex.Bridge.DependencyManager.add_dependency(sid, f, t)
      iex> {:ok, [:a, _, _, :d]} = DSPex.Bridge.DependencyManager.get_update_order(sid, :a)
      iex> DSPex.Bridge.DependencyManager.get_update_order(sid, :d)
      {:ok, [:d]}
  """
  @spec get_update_order(session_id, ident | [ident], keyword) ::
          {:ok, [ident]} | {:error, reason}
  def get_update_order(session_id, changed, opts \\ []) do
    backend().graph_update_order(session_id, List.wrap(changed), principal(opts))
  end

  @doc """
  Writes `new_value` to `var` and propagates the change to its dependents,
  asynchronously, through the session's propagation worker (so the write is
  ordered with the propagation it causes). A write the variable rejects is
  reported as `[:dspex, :bridge, :propagation, :exception]` and recorded in
  the dead letters.
  """
  @spec propagate_change(session_id, ident, term, map) :: :ok | {:error, reason}
  def propagate_change(session_id, var, new_value, metadata \\ %{}) when is_map(metadata) do
    with {:ok, pid} <- Propagator.ensure(session_id) do
      GenServer.cast(pid, {:set, var, new_value, metadata})
    end
  end

  @doc """
  Registers `name`, a variable of `type` computed by `compute_fun` from
  `inputs`, and keeps it up to date. The function gets a map
  `%{input => value}` and returns the new value. It is called once now for
  the initial value; if that raises, nothing is registered and the result is
  `{:error, {:compute_failed, exception_or_reason}}`.

  Options: `constraints:`, `description:`, `metadata:` (as for
  `SessionStore.register_variable/5`; the metadata gains
  `derived_from: inputs`). Edges `input -> name` of type `:derived` are
  added, so `get_dependencies/3` and `visualize_graph/2` show them.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-derived")
      iex> {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, :x, :integer, 2)
      iex> {:ok, _} = DSPex.Bridge.DependencyManager.defderived(sid, :x2, :integer, [:x], &(&1.x * 2))
      iex> :ok = DSPex.Bridge.SessionStore.update_variable(sid, :x, 5)
      iex> :ok = DSPex.Bridge.DependencyManager.await_propagation(sid)
      iex> DSPex.Bridge.SessionStore.get_variable_value(sid, :x2)
      10
  """
  @spec defderived(session_id, ident, atom, [ident, ...], compute_fun, keyword) ::
          {:ok, String.t()} | {:error, reason}
  def defderived(session_id, name, type, inputs, compute_fun, opts \\ []) do
    opts = Keyword.validate!(opts, [:constraints, :description, :metadata])

    cond do
      not (is_atom(name) or is_binary(name)) or name in [nil, true, false] ->
        {:error, {:invalid_argument, {:name, name}}}

      not is_list(inputs) or inputs == [] ->
        {:error, {:invalid_argument, {:inputs, inputs}}}

      not is_function(compute_fun, 1) ->
        {:error, {:invalid_argument, {:compute_fun, compute_fun}}}

      true ->
        with {:ok, pid} <- Propagator.ensure(session_id) do
          GenServer.call(pid, {:define, name, type, inputs, compute_fun, opts}, :infinity)
        end
    end
  end

  @doc """
  The state of a derived variable: `%{status: :fresh | :stale, inputs,
  error, computed_at}` (`error` is the last failure while stale).
  """
  @spec derived_status(session_id, ident) :: {:ok, map} | {:error, reason}
  def derived_status(session_id, name) do
    call(session_id, {:status, name}, {:error, :not_found})
  end

  @doc """
  Failed recomputations, oldest first: `%{id, variable, reason, caused_by,
  at}`. At most 100 are kept per session (the oldest go first).
  """
  @spec dead_letters(session_id) :: {:ok, [map]} | {:error, reason}
  def dead_letters(session_id), do: call(session_id, :dead_letters, {:ok, []})

  @doc """
  Recomputes every derived variable in the dead letters now, from the
  current values of its inputs, and propagates from it. Entries that succeed
  leave the list, as do failures that happen again (they come back as new
  entries): `{:ok, %{replayed: n, failed: m}}`. Entries for rejected
  `propagate_change/4` writes are not recomputations and stay.
  """
  @spec replay_dead_letters(session_id) :: {:ok, map} | {:error, reason}
  def replay_dead_letters(session_id),
    do: call(session_id, :replay, {:ok, %{replayed: 0, failed: 0}})

  @doc """
  Returns once every change the worker has been told of before this call
  has been propagated. Writes from the calling process are always told
  before the write returns, so this is the barrier tests and scripts want.
  """
  @spec await_propagation(session_id, timeout) :: :ok
  def await_propagation(session_id, timeout \\ 5_000), do: call(session_id, :sync, :ok, timeout)

  @doc """
  The graph as text: Graphviz DOT (`:dot`, the default) or a Mermaid
  flowchart (`:mermaid`). Edges of a type other than `:data` are labelled.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-viz")
      iex> for v <- [:a, :b], do: {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, v, :integer, 0)
      iex> :ok = DSPex.Bridge.DependencyManager.add_dependency(sid, :a, :b)
      iex> {:ok, dot} = DSPex.Bridge.DependencyManager.visualize_graph(sid)
      iex> IO.iodata_to_binary(dot)
      "digraph dependencies {\\n  rankdir=LR;\\n  \\"a\\" -> \\"b\\";\\n}\\n"
      iex> {:ok, mermaid} = DSPex.Bridge.DependencyManager.visualize_graph(sid, :mermaid)
      iex> IO.iodata_to_binary(mermaid)
      "graph LR\\n  v0[\\"a\\"] --> v1[\\"b\\"]\\n"
  """
  @spec visualize_graph(session_id, :dot | :mermaid, keyword) :: {:ok, iodata} | {:error, reason}
  def visualize_graph(session_id, format \\ :dot, opts \\ [])

  def visualize_graph(session_id, format, opts) when format in @formats,
    do: backend().graph_render(session_id, format, principal(opts))

  def visualize_graph(_session_id, format, _opts),
    do: {:error, {:invalid_argument, {:unknown_format, format}}}

  @doc "Counts for diagnostics: `%{edges: n, vertices: n}`."
  @spec graph_info(session_id, keyword) :: {:ok, map} | {:error, reason}
  def graph_info(session_id, opts \\ []), do: backend().graph_info(session_id, principal(opts))

  defp backend, do: DSPex.Bridge.Backend.Router

  defp principal([]), do: nil
  defp principal(opts), do: Keyword.validate!(opts, [:principal])[:principal]

  defp removed(session_id, count, metadata) do
    Telemetry.execute(
      [:dspex, :bridge, :dependency, :removed],
      %{count: count},
      Map.put(metadata, :session_id, session_id)
    )
  end

  # Sessions without a worker have no derived variables: answer `none`.
  defp call(session_id, request, none, timeout \\ 5_000) do
    case Propagator.whereis(session_id) do
      nil -> none
      pid -> GenServer.call(pid, request, timeout)
    end
  catch
    :exit, {:noproc, _} -> none
  end
end
