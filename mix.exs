# The project's own cargo compiler lives beside the code it builds; it is
# required here (not compiled into the library) so it exists before the first
# compile, also when dspex_bridge is used as a path dependency.
Code.require_file("lib/mix/tasks/compile.dspex_cargo.exs", __DIR__)

# ra (Raft) and its dependencies, fetched by scripts/setup.sh from Debian's
# rabbitmq-server package into .cache/ra (no Hex here): on the code path of
# every mix command when present. Replicated sessions need it; everything
# else works without it.
for ebin <- Path.wildcard(Path.join(__DIR__, ".cache/ra/*/ebin")), do: Code.prepend_path(ebin)

defmodule DSPex.Bridge.MixProject do
  use Mix.Project

  @version "0.1.0"

  def project do
    [
      app: :dspex_bridge,
      version: @version,
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:dspex_cargo | Mix.compilers()],
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      docs: [main: "readme", extras: ["README.md"]],
      test_coverage: [ignore_modules: [DSPex.Bridge.Native]],
      # ra is optional (see the top of this file): not a declared dependency.
      xref: [exclude: [:ra, :ra_system, :ra_directory, :ra_leaderboard]]
    ]
  end

  def application do
    [
      extra_applications: [:logger, :crypto],
      mod: {DSPex.Bridge.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
