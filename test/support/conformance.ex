defmodule DSPex.Bridge.Conformance do
  @moduledoc """
  The backend conformance suite: cases written once against the public API
  and run against every backend (`:nif` and `:port`), so the two can never
  drift apart.

  A test module runs case modules:

      defmodule DSPex.Bridge.SessionStoreTest do
        use ExUnit.Case, async: true
        use DSPex.Bridge.Conformance, cases: [DSPex.Bridge.Conformance.SessionStoreCases]
      end

  which generates, `for backend <- [:nif, :port]` and for each case, a test
  named `"<backend>: <case>"` tagged `backend: backend`, located at the
  case's own file and line (a failure names them). Each case gets a
  context with a fresh session in that backend:
  `%{sid: sid, backend: backend}`.

  A later feature extends the suite with its own case module (see
  `DSPex.Bridge.Conformance.Case`) and adds it to a `cases:` list. Cases
  that create further sessions use `new_session/2`, so those land in the
  backend under test too.
  """

  alias DSPex.Bridge.SessionStore

  @backends [:nif, :port]

  @doc "The backends every case runs against."
  @spec backends() :: [atom]
  def backends, do: @backends

  defmacro __using__(opts) do
    cases = Keyword.fetch!(opts, :cases)
    backends = Keyword.get(opts, :backends, @backends)

    quote bind_quoted: [cases: cases, backends: backends] do
      for backend <- backends,
          mod <- cases,
          {name, fun, file, line} <- mod.__conformance_cases__() do
        @conformance_case {backend, mod, fun}
        @tag backend: backend
        # Registered at the case's own file and line, so a failure names
        # the case, not this `use`.
        test =
          ExUnit.Case.register_test(
            %{__ENV__ | file: file, line: line},
            :test,
            "#{backend}: #{name}",
            []
          )

        def unquote(test)(_context) do
          {backend, mod, fun} = @conformance_case
          apply(mod, fun, [DSPex.Bridge.Conformance.context(backend)])
        end
      end
    end
  end

  @doc "The context of one case: a fresh session in `backend`, deleted afterwards."
  @spec context(atom) :: map
  def context(backend) do
    %{sid: new_session(%{backend: backend}), backend: backend}
  end

  @doc """
  Creates a uniquely named session in the context's backend, deleted when
  the test ends; `opts` as for `SessionStore.create_session/2`.
  """
  @spec new_session(map, keyword) :: String.t()
  def new_session(%{backend: backend}, opts \\ []) do
    sid = unique_id(backend)
    {:ok, ^sid} = SessionStore.create_session(sid, Keyword.put(opts, :backend, backend))
    ExUnit.Callbacks.on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  @doc "A session id no test has used, with the backend in its name."
  @spec unique_id(atom) :: String.t()
  def unique_id(backend), do: "conf_#{backend}_#{System.unique_integer([:positive])}"
end

defmodule DSPex.Bridge.Conformance.Case do
  @moduledoc """
  Defines conformance cases:

      defmodule DSPex.Bridge.Conformance.MyFeatureCases do
        use DSPex.Bridge.Conformance.Case

        conformance "my_fun/2 does the thing", %{sid: sid, backend: backend} do
          assert {:ok, _} = MyFeature.my_fun(sid, :x)
        end
      end

  A case is a function of the context; `ExUnit.Assertions` are imported.
  """

  defmacro __using__(_opts) do
    quote do
      import ExUnit.Assertions
      import DSPex.Bridge.Conformance.Case, only: [conformance: 2, conformance: 3]
      Module.register_attribute(__MODULE__, :conformance_cases, accumulate: true)
      @before_compile DSPex.Bridge.Conformance.Case
    end
  end

  @doc "Defines one case, run with the context matched against `ctx`."
  defmacro conformance(name, ctx \\ quote(do: _), do: body) do
    fun = :"case: #{name}"

    file = __CALLER__.file
    line = __CALLER__.line

    quote do
      @conformance_cases {unquote(name), unquote(fun), unquote(file), unquote(line)}
      def unquote(fun)(unquote(ctx)), do: unquote(body)
    end
  end

  defmacro __before_compile__(_env) do
    quote do
      @doc false
      def __conformance_cases__, do: Enum.reverse(@conformance_cases)
    end
  end
end
