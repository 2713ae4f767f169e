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
  - writes that arrive while the worker is busy are coalesced into one pass
    (the worker's mailbox holds one wake-up however many writes arrive);
  - the derived write's metadata names the writes that caused it:
    `%{derived: true, caused_by: [%{variable: :temperature, version: 4}]}`;
  - a compute function that raises, exits, overruns its deadline (or
    returns a value the variable's type rejects) marks the variable stale,
    leaves its last value in place, emits
    `[:dspex, :bridge, :propagation, :failed]` and is recorded in the
    session's dead letters (`dead_letters/1`, `replay_dead_letters/2`);
    nothing else stops;
  - a recomputation the backend refuses for now (`:overloaded` at a port
    program's or a Raft node's admission limit, `:rate_limited`) is tried
    again for up to `overload_patience` ms, a budget per pass (`config :dspex_bridge,
    DSPex.Bridge.DependencyManager, overload_patience: ms`, 5,000 unless
    set); still refused, it is reported once as above and recomputed again
    from its inputs' values after a pause doubling from 50 ms to 1 s, until
    admitted. So a derived variable equals f of its inputs once the backend
    admits its writes again, with no further write to its inputs, and the
    refusal's dead letters are removed then.

  Every call of a compute function runs apart from the worker, in a process
  unlinked and monitored, under a deadline: the `compute_timeout:` of
  `defderived/6`, by default `config :dspex_bridge,
  DSPex.Bridge.DependencyManager, compute_timeout: ms` (5,000 unless set).
  The calls of one pass share that process, and each finds it as a fresh
  one (an empty mailbox, a fresh process dictionary); a call that fails,
  or leaves a link, a monitor or a changed process flag behind, ends the
  process, and the next call gets a new one. What a call links to ends
  with it; overrunning its deadline kills it and counts as a failure with
  reason `:timeout`.

  Definitions are kept outside the worker
  (`DSPex.Bridge.DependencyManager.Table`). A worker that dies anyway is
  restarted with them and recomputes every derived variable; the death is
  a dead letter `%{variable: nil, reason: {:worker_exit, reason}}`, a
  `[:dspex, :bridge, :propagation, :failed]` event with `variable: nil`,
  and counts in the `restarts` of `derived_status/3`.

  Writing to a variable that is no derived variable's input costs nothing
  extra: sessions without derived variables have no worker, and the write
  path checks for one with a single `:persistent_term` lookup; in a session
  with derived variables it then checks, with one more lookup, whether the
  variable is an input of one, and only then tells the worker. (Edges added
  with `add_dependency/5` order the recomputations; a derived variable is
  recomputed when one of its `inputs` changed.)

  Compute functions are code, not data, so they are not part of snapshots:
  an imported session has its edges but must `defderived/6` again to
  recompute.

  ## Access

  Every function takes `principal:`, the session on whose behalf the call
  is made (default: the session itself), and is checked by the engine's
  access rules (see `DSPex.Bridge.AccessControl`); a refusal is
  `{:error, :access_denied}`, audited. Adding an edge needs read access to
  `from` and write access to `to`; `defderived/6` needs read access to its
  inputs and the right to register the variable (only the session itself
  has it); `propagate_change/5` needs write access, `derived_status/3` read
  access. The recomputations a write triggers run with the permissions of
  the definer, whoever made the write: a principal allowed to write an
  input changes the derived variable only through its compute function.

  Options are keyword lists; anything else, an unknown option or a bad
  value is `{:error, {:invalid_argument, detail}}` (`{:bad_options, opts}`,
  `{:unknown_options, keys}`, `{:duplicate_options, keys}` or
  `{key, value}`, as everywhere in the library). No call waits without
  bound: `await_propagation/2` and `replay_dead_letters/2` return
  `{:error, :timeout}` after their timeout, `defderived/6` returns within
  its compute deadline (plus the engine calls), and `derived_status/3` and
  `dead_letters/1` do not wait for the worker at all.
  """

  alias DSPex.Bridge.{AccessControl, Options, SessionStore, Telemetry}
  alias DSPex.Bridge.DependencyManager.{Propagator, Table}

  @type session_id :: String.t()
  @type ident :: atom | String.t()
  @type reason :: atom | {atom, term}
  @type compute_fun :: (%{ident => term} -> term)

  @formats [:dot, :mermaid]
  @default_compute_timeout 5_000
  # The longest `receive ... after` the VM takes.
  @max_timeout 4_294_967_295

  @doc """
  The session's dependency process (the worker that recomputes its derived
  variables), started if needed: `{:ok, pid}`, the same `pid` while it
  runs. The library supervises it (it is not linked to the caller) and
  starts it itself whenever a call needs it; seed 002 starts one per
  session, so this is that call. `{:error, :session_not_found}` for a
  session that does not exist.
  """
  @spec start_link(session_id) :: {:ok, pid} | {:error, reason}
  def start_link(session_id), do: Propagator.ensure(session_id)

  @doc """
  Adds `from -> to`: `to` depends on `from`. Adding an edge that exists
  replaces its type and returns `:ok`. Options: `principal:`.

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
    with {:ok, opts} <- options(opts, [:principal]) do
      session_id
      |> backend().graph_add_edge(from, to, type, opts[:principal])
      |> added(session_id, from, to, type)
    end
  end

  def add_dependency(_session_id, _from, _to, type, _opts),
    do: {:error, {:invalid_argument, {:edge_type, type}}}

  defp added({:ok, true}, session_id, from, to, type) do
    Telemetry.execute(
      [:dspex, :bridge, :dependency, :added],
      %{system_time: System.system_time()},
      %{session_id: session_id, from: from, to: to, type: type}
    )

    :ok
  end

  defp added({:ok, false}, _session_id, _from, _to, _type), do: :ok

  defp added({:error, {:would_create_cycle, path}}, session_id, from, to, _type) do
    Telemetry.execute(
      [:dspex, :bridge, :dependency, :cycle_detected],
      %{system_time: System.system_time(), path_length: length(path)},
      %{session_id: session_id, from: from, to: to, path: path}
    )

    {:error, :would_create_cycle}
  end

  defp added({:error, _} = error, _session_id, _from, _to, _type), do: error

  @doc """
  Removes `from -> to`. Removing an edge that does not exist is `:ok`.
  Options: `principal:`.
  """
  @spec remove_dependency(session_id, ident, ident, keyword) :: :ok | {:error, reason}
  def remove_dependency(session_id, from, to, opts \\ []) do
    with {:ok, opts} <- options(opts, [:principal]),
         {:ok, removed?} <- backend().graph_remove_edge(session_id, from, to, opts[:principal]) do
      if removed?, do: removed(session_id, 1, %{from: from, to: to})
      :ok
    end
  end

  @doc """
  Removes every edge touching `var`, in both directions: what it depends on
  and what depends on it. Options: `principal:`.
  """
  @spec clear_dependencies(session_id, ident, keyword) :: :ok | {:error, reason}
  def clear_dependencies(session_id, var, opts \\ []) do
    with {:ok, opts} <- options(opts, [:principal]),
         {:ok, count} <- backend().graph_clear(session_id, var, opts[:principal]) do
      if count > 0, do: removed(session_id, count, %{from: nil, to: nil, variable: var})
      :ok
    end
  end

  @doc """
  What `var` depends on, in topological order (what must be computed first,
  first). Direct dependencies unless `transitive: true`. Options:
  `transitive:`, `principal:`.
  """
  @spec get_dependencies(session_id, ident, keyword) :: {:ok, [ident]} | {:error, reason}
  def get_dependencies(session_id, var, opts \\ []) do
    with {:ok, opts} <- options(opts, [:transitive, :principal]) do
      backend().graph_dependencies(session_id, var, opts[:transitive] == true, opts[:principal])
    end
  end

  @doc """
  What depends on `var`, in topological order. Direct dependents unless
  `transitive: true`. Options: `transitive:`, `principal:`.
  """
  @spec get_dependents(session_id, ident, keyword) :: {:ok, [ident]} | {:error, reason}
  def get_dependents(session_id, var, opts \\ []) do
    with {:ok, opts} <- options(opts, [:transitive, :principal]) do
      backend().graph_dependents(session_id, var, opts[:transitive] == true, opts[:principal])
    end
  end

  @doc """
  The order in which to update after `changed` (one variable or a list)
  changed: the changed variables, then each transitive dependent once, in
  the maintained topological order. Options: `principal:`.

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
    with {:ok, opts} <- options(opts, [:principal]) do
      backend().graph_update_order(session_id, List.wrap(changed), opts[:principal])
    end
  end

  @doc """
  Writes `new_value` to `var`, as `principal:` (which needs write access;
  default: the session itself), and propagates the change to its dependents
  asynchronously, as any write does (`await_propagation/2` waits for it).
  Returns the write's result. A write rejected for its value (not refused:
  access denials and rate limits are audited instead) is also reported as
  `[:dspex, :bridge, :propagation, :failed]` and recorded in the dead
  letters. Options: `principal:`, `context:`.
  """
  @spec propagate_change(session_id, ident, term, map, keyword) :: :ok | {:error, reason}
  def propagate_change(session_id, var, new_value, metadata \\ %{}, opts \\ [])

  def propagate_change(session_id, var, new_value, metadata, opts) when is_map(metadata) do
    start = System.monotonic_time()

    with {:ok, opts} <- options(opts, [:principal, :context]) do
      case SessionStore.update_variable(session_id, var, new_value, metadata, opts) do
        {:error, reason} = error
        when reason not in [:access_denied, :rate_limited, :session_not_found] and
               is_binary(session_id) ->
          cause = [%{variable: var, propagate_change: true}]
          Propagator.report(session_id, var, {:write_rejected, reason}, cause, start)
          error

        result ->
          result
      end
    end
  end

  def propagate_change(_session_id, _var, _new_value, metadata, _opts),
    do: {:error, {:invalid_argument, {:metadata, metadata}}}

  @doc """
  Registers `name`, a variable of `type` computed by `compute_fun` from
  `inputs` (a non-empty list of variable names or ids), and keeps it up to
  date. The function gets a map `%{input => value}` and returns the new
  value. It is called once now (the caller waits) for the initial value;
  if that raises, exits or overruns its deadline, nothing is registered and
  the result is `{:error, {:compute_failed, exception | {kind, reason} |
  :timeout}}`.

  Options: `constraints:`, `description:`, `metadata:`, `access_rules:` (as
  for `SessionStore.register_variable/5`; the metadata gains
  `derived_from: inputs`), `compute_timeout:` (the deadline of each call of
  `compute_fun`, in ms; default: see the moduledoc), `principal:`,
  `context:` (the inputs are read and the variable registered as that
  principal, and so are later recomputations). Edges `input -> name` of type
  `:derived` are added, so `get_dependencies/3` and `visualize_graph/3` show
  them.

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
    known = [
      :constraints,
      :description,
      :metadata,
      :access_rules,
      :compute_timeout,
      :principal,
      :context
    ]

    with {:ok, opts} <- options(opts, known),
         :ok <- check_name(name),
         :ok <- check_inputs(inputs),
         :ok <- check_fun(compute_fun),
         {:ok, timeout} <- compute_timeout(opts) do
      opts = Keyword.put(opts, :compute_timeout, timeout)
      Propagator.define(session_id, name, type, inputs, compute_fun, opts)
    end
  end

  @doc """
  The state of a derived variable: `%{status: :fresh | :stale, inputs,
  error, computed_at, compute_timeout, restarts}` (`error` is the last
  failure while stale; `restarts` how many times the session's worker died
  and was restarted). Answered without waiting for the worker. Needs read
  access to the variable. Options: `principal:`, `context:`.
  """
  @spec derived_status(session_id, ident, keyword) :: {:ok, map} | {:error, reason}
  def derived_status(session_id, name, opts \\ []) do
    with {:ok, opts} <- options(opts, [:principal, :context]),
         :ok <- AccessControl.authorize(session_id, name, :read, opts),
         %{} = d <- Table.find(session_id, name),
         %{} = status <- Table.status(session_id, d.key) do
      {:ok,
       Map.merge(status, %{
         inputs: d.inputs,
         compute_timeout: d.compute_timeout,
         restarts: Table.restarts(session_id)
       })}
    else
      nil -> {:error, :not_found}
      {:error, _} = error -> error
    end
  end

  @doc """
  Failed recomputations, oldest first: `%{id, variable, reason, caused_by,
  at, dlq_id}`. They are entries of `DSPex.Bridge.DeadLetterQueue` (kind
  `:propagation`, `dlq_id` their id there); this is the view of one
  session's. At most 100 are kept per session (the oldest are evicted,
  each with a `[:dspex, :bridge, :dlq, :evicted]` event). Answered without
  waiting for the worker.
  """
  @spec dead_letters(session_id) :: {:ok, [map]} | {:error, reason}
  def dead_letters(session_id), do: {:ok, Table.letters(session_id)}

  @doc """
  Recomputes every derived variable in the dead letters now, from the
  current values of its inputs, and propagates from it. Entries that succeed
  leave the list, as do failures that happen again (they come back as new
  entries): `{:ok, %{replayed: n, failed: m}}`. Entries that are not
  recomputations (rejected `propagate_change/5` writes, a worker's death)
  stay. Options: `timeout:` (ms, default 5,000): after it, `{:error,
  :timeout}` (a replay the worker has not begun is withdrawn; one it has
  begun completes).
  """
  @spec replay_dead_letters(session_id, keyword) :: {:ok, map} | {:error, reason}
  def replay_dead_letters(session_id, opts \\ []) do
    with {:ok, opts} <- options(opts, [:timeout]) do
      case Propagator.whereis(session_id) do
        nil -> {:ok, %{replayed: 0, failed: 0}}
        _pid -> Propagator.await(session_id, :replay, Keyword.get(opts, :timeout, 5_000))
      end
    end
  end

  @doc """
  Returns `:ok` once every change the worker has been told of before this
  call has been propagated, or `{:error, :timeout}` after `timeout` ms.
  Writes from the calling process are always told before the write
  returns, so this is the barrier tests and scripts want.
  """
  @spec await_propagation(session_id, timeout) :: :ok | {:error, reason}
  def await_propagation(session_id, timeout \\ 5_000) do
    with {:ok, _} <- options([timeout: timeout], [:timeout]) do
      case Propagator.whereis(session_id) do
        nil -> :ok
        _pid -> Propagator.await(session_id, :sync, timeout)
      end
    end
  end

  @doc """
  The graph as text: Graphviz DOT (`:dot`, the default) or a Mermaid
  flowchart (`:mermaid`). Edges of a type other than `:data` are labelled.
  Options: `principal:`.

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

  def visualize_graph(session_id, format, opts) when format in @formats do
    with {:ok, opts} <- options(opts, [:principal]),
         do: backend().graph_render(session_id, format, opts[:principal])
  end

  def visualize_graph(_session_id, format, _opts),
    do: {:error, {:invalid_argument, {:unknown_format, format}}}

  @doc "Counts for diagnostics: `%{edges: n, vertices: n}`. Options: `principal:`."
  @spec graph_info(session_id, keyword) :: {:ok, map} | {:error, reason}
  def graph_info(session_id, opts \\ []) do
    with {:ok, opts} <- options(opts, [:principal]),
         do: backend().graph_info(session_id, opts[:principal])
  end

  defp backend, do: DSPex.Bridge.Backend.Router

  defp removed(session_id, count, metadata) do
    Telemetry.execute(
      [:dspex, :bridge, :dependency, :removed],
      %{count: count},
      Map.put(metadata, :session_id, session_id)
    )
  end

  ## Arguments

  # A keyword list of `known` options with good values, or an invalid
  # argument (the library's one options policy, `DSPex.Bridge.Options`).
  defp options(opts, known) do
    with {:ok, opts} <- Options.validate(opts, known) do
      case Enum.find(opts, &(not good_option?(&1))) do
        nil -> {:ok, opts}
        {key, value} -> Options.bad(key, value)
      end
    end
  end

  defp good_option?({:principal, p}), do: p == nil or is_binary(p)
  defp good_option?({:context, c}), do: c == nil or is_map(c)
  defp good_option?({:transitive, t}), do: is_boolean(t)
  defp good_option?({:compute_timeout, t}), do: deadline?(t)
  defp good_option?({:timeout, t}), do: t == :infinity or (is_integer(t) and t in 0..@max_timeout)
  defp good_option?({:metadata, m}), do: m == nil or is_map(m)
  defp good_option?({:constraints, c}), do: c == nil or is_map(c)
  defp good_option?({:description, d}), do: d == nil or is_binary(d)
  defp good_option?({:access_rules, r}), do: r == nil or is_list(r)

  defp deadline?(t), do: is_integer(t) and t in 1..@max_timeout

  defp compute_timeout(opts) do
    timeout =
      case Keyword.fetch(opts, :compute_timeout) do
        {:ok, timeout} ->
          timeout

        :error ->
          case Application.get_env(:dspex_bridge, __MODULE__, []) do
            config when is_list(config) ->
              Keyword.get(config, :compute_timeout, @default_compute_timeout)

            config ->
              {:config, config}
          end
      end

    if deadline?(timeout),
      do: {:ok, timeout},
      else: {:error, {:invalid_argument, {:compute_timeout, timeout}}}
  end

  defp check_name(name) do
    if ident?(name), do: :ok, else: {:error, {:invalid_argument, {:name, name}}}
  end

  defp check_inputs(inputs) do
    cond do
      inputs == [] or not proper_list?(inputs) ->
        {:error, {:invalid_argument, {:inputs, inputs}}}

      (bad = Enum.reject(inputs, &ident?/1)) != [] ->
        {:error, {:invalid_argument, {:input, hd(bad)}}}

      true ->
        :ok
    end
  end

  defp check_fun(fun) do
    if is_function(fun, 1), do: :ok, else: {:error, {:invalid_argument, {:compute_fun, fun}}}
  end

  defp ident?(x), do: is_binary(x) or (is_atom(x) and x not in [nil, true, false])

  defp proper_list?([]), do: true
  defp proper_list?([_ | rest]), do: proper_list?(rest)
  defp proper_list?(_), do: false
end
