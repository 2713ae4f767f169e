defmodule Mix.Tasks.Compile.DspexCargoTest do
  # Builds a host project in a temp dir: runs mix (and cargo, a no-op when
  # target/ is up to date) in subprocesses.
  use ExUnit.Case, async: true

  @moduletag timeout: 600_000

  alias Mix.Tasks.Compile.DspexCargo

  @root Path.expand("../..", __DIR__)
  @outputs ["libdspex_nif.so", "dspex_port"]

  test "the outputs are placed under the app's build path, where priv_dir looks" do
    dir = DspexCargo.output_dir()
    assert dir == Path.join(Mix.Project.app_path(), "priv/native")
    assert dir == Path.join(to_string(:code.priv_dir(:dspex_bridge)), "native")
    for name <- DspexCargo.outputs(), do: assert(File.exists?(Path.join(dir, name)), name)
  end

  describe "as a dependency of a host" do
    setup do
      tmp = Path.join(System.tmp_dir!(), "dspex-host-#{System.unique_integer([:positive])}")
      on_exit(fn -> File.rm_rf(tmp) end)
      %{tmp: tmp, dep: fresh_checkout(Path.join(tmp, "dspex_bridge"))}
    end

    @tag :release
    test "mix release with build_embedded: true ships both native files, and the release boots",
         %{tmp: tmp, dep: dep} do
      host = Path.join(tmp, "host")
      telemetry = Path.join(tmp, "telemetry")
      File.mkdir_p!(Path.join(host, "lib"))
      File.mkdir_p!(Path.join(host, "config"))
      File.mkdir_p!(Path.join(telemetry, "src"))

      # A :telemetry of the host's (the fake one), to check the boot order too.
      File.write!(Path.join(telemetry, "src/telemetry.erl"), DSPex.FakeTelemetry.source())

      File.write!(Path.join(telemetry, "mix.exs"), """
      defmodule Telemetry.MixProject do
        use Mix.Project
        def project, do: [app: :telemetry, version: "1.0.0", language: :erlang]
        def application, do: [mod: {:telemetry, []}]
      end
      """)

      File.write!(Path.join(host, "mix.exs"), """
      defmodule Host.MixProject do
        use Mix.Project

        def project do
          [
            app: :host,
            version: "0.1.0",
            build_embedded: true,
            deps: [{:dspex_bridge, path: #{inspect(dep)}}, {:telemetry, path: #{inspect(telemetry)}}],
            releases: [host: [include_erts: false]]
          ]
        end

        def application, do: [extra_applications: [:logger]]
      end
      """)

      File.write!(Path.join(host, "config/config.exs"), """
      import Config
      config :dspex_bridge, analytics: true
      """)

      File.write!(Path.join(host, "lib/host.ex"), "defmodule Host do\nend\n")

      assert {out, 0} = mix(host, ["release", "--overwrite"])
      assert [lib] = Path.wildcard(Path.join(host, "_build/prod/rel/host/lib/dspex_bridge-*"))

      for name <- @outputs do
        assert File.exists?(Path.join([lib, "priv/native", name])), "#{name} missing\n#{out}"
      end

      # Nothing was written into the dependency's source tree.
      refute File.exists?(Path.join(dep, "priv/native"))

      check = """
      {:ok, _} = Application.ensure_all_started(:host)
      IO.inspect({DSPex.Bridge.Health.ready(), DSPex.Bridge.Analytics.running?(),
                  {DSPex.Bridge.Analytics, :handler} in Enum.map(:telemetry.handlers(), &elem(&1, 0))},
                 width: :infinity)
      """

      assert {out, 0} =
               System.cmd(Path.join(host, "_build/prod/rel/host/bin/host"), ["eval", check])

      assert out =~
               "{{:ok, %{nif: :ok, port: :not_configured, raft: :not_configured, store: :ok}}, true, true}"
    end

    test "the compiler honours --force and mix clean removes its outputs", %{dep: dep} do
      out_dir = Path.join(dep, "_build/prod/lib/dspex_bridge/priv/native")
      assert {out, 0} = mix(dep, ["compile.dspex_cargo"])
      assert out =~ "cargo build"
      for name <- DspexCargo.outputs(), do: assert(File.exists?(Path.join(out_dir, name)))

      # Up to date: cargo is not run again, unless forced.
      assert {out, 0} = mix(dep, ["compile.dspex_cargo"])
      refute out =~ "cargo build"
      assert {out, 0} = mix(dep, ["compile.dspex_cargo", "--force"])
      assert out =~ "cargo build"

      clean = "Mix.Tasks.Compile.DspexCargo.clean()"
      assert {_, 0} = mix(dep, ~w(run --no-compile --no-start --no-deps-check -e) ++ [clean])
      for name <- DspexCargo.outputs(), do: refute(File.exists?(Path.join(out_dir, name)))
    end
  end

  # What a fresh clone looks like: the sources, an empty priv/, and no build
  # outputs. The Rust sources and target/ are links, so cargo reuses the
  # build of this checkout instead of compiling everything again.
  defp fresh_checkout(dir) do
    File.mkdir_p!(Path.join(dir, "priv"))
    File.write!(Path.join(dir, "priv/.gitkeep"), "")

    for name <- ~w(lib native target Cargo.toml Cargo.lock mix.exs .formatter.exs) do
      File.ln_s!(Path.join(@root, name), Path.join(dir, name))
    end

    dir
  end

  defp mix(dir, args) do
    env = [{"MIX_ENV", "prod"}, {"MIX_EXS", nil}, {"MIX_BUILD_PATH", nil}]
    System.cmd("mix", args, cd: dir, env: env, stderr_to_stdout: true)
  end
end
