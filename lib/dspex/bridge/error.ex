defmodule DSPex.Bridge.Error do
  @moduledoc """
  Named exceptions raised by the `!` variants (`DSPex.Variables.set!/4` and
  friends). Each carries the `reason` the non-bang function would have
  returned, so `rescue e in DSPex.Bridge.Error.VersionMismatch -> e.reason`
  gives `{:version_mismatch, current}`.
  """

  @doc "The exception for an error `reason`."
  @spec exception_for(term, map) :: Exception.t()
  def exception_for(reason, context \\ %{}) do
    module =
      case reason do
        :not_found -> __MODULE__.VariableNotFound
        {:not_found, _} -> __MODULE__.VariableNotFound
        :session_not_found -> __MODULE__.SessionNotFound
        {:invalid_value, _} -> __MODULE__.InvalidValue
        {:constraint_violation, _} -> __MODULE__.ConstraintViolation
        {:version_mismatch, _} -> __MODULE__.VersionMismatch
        :access_denied -> __MODULE__.AccessDenied
        _ -> __MODULE__.BridgeError
      end

    module.exception(reason: reason, context: context)
  end

  for {name, what} <- [
        VariableNotFound: "variable not found",
        SessionNotFound: "session not found",
        InvalidValue: "invalid value",
        ConstraintViolation: "constraint violation",
        VersionMismatch: "version mismatch",
        AccessDenied: "access denied",
        BridgeError: "bridge operation failed"
      ] do
    defmodule Module.concat(__MODULE__, name) do
      @moduledoc "Raised when a `!` function fails with: #{what}."
      defexception [:reason, context: %{}]

      @impl true
      def message(%{reason: reason, context: context}) do
        where =
          case context do
            %{variable: var} -> " (variable #{inspect(var)})"
            _ -> ""
          end

        unquote(what) <> where <> ": " <> inspect(reason)
      end
    end
  end
end
