defmodule Mix.Tasks.Compile.DspexCargo do
  @shortdoc "Builds the dspex_bridge Rust crates into the app's priv/native"
  @moduledoc """
  Builds the Cargo workspace (release profile) and copies the NIF library, the
  port program and the gRPC gateway to `priv/native/` of the application's *build* path
  (`Mix.Project.app_path/0`), where `:code.priv_dir(:dspex_bridge)` looks in
  dev, test, releases and `build_embedded: true` alike. (Without
  `build_embedded` Mix links that `priv` to the source tree's, so the files
  also show up in `priv/native/` of the checkout.)

  Cargo runs only when a Rust source, a `Cargo.toml` or `Cargo.lock` is newer
  than the outputs, so an Elixir-only compile pays nothing. `--force` (as in
  `mix compile --force`) or `DSPEX_CARGO_FORCE=1` always runs cargo;
  `CARGO_TARGET_DIR` is honoured. `mix clean` removes the copied outputs
  (not cargo's `target/`).
  """
  use Mix.Task.Compiler

  @outputs [
    {"libdspex_nif.so", ["libdspex_nif.so", "libdspex_nif.dylib"]},
    {"dspex_port", ["dspex_port"]},
    {"dspex_grpc", ["dspex_grpc"]}
  ]

  @impl true
  def run(args) do
    {opts, _, _} = OptionParser.parse(args, switches: [force: :boolean])
    root = Path.dirname(Path.dirname(Path.dirname(__DIR__)))
    priv = output_dir()

    if opts[:force] || System.get_env("DSPEX_CARGO_FORCE") in ["1", "true"] ||
         stale?(root, priv) do
      build(root, priv)
    else
      {:noop, []}
    end
  end

  @doc "Where the outputs go: `priv/native` under the app's build path."
  @spec output_dir(keyword) :: Path.t()
  def output_dir(config \\ Mix.Project.config()) do
    Path.join(Mix.Project.app_path(config), "priv/native")
  end

  @doc "The files placed in `output_dir/0`."
  @spec outputs() :: [String.t()]
  def outputs, do: Enum.map(@outputs, &elem(&1, 0))

  @impl true
  def clean do
    for name <- outputs(), do: File.rm(Path.join(output_dir(), name))
    :ok
  end

  defp stale?(root, priv) do
    outputs = Enum.map(@outputs, fn {dest, _} -> Path.join(priv, dest) end)

    not Enum.all?(outputs, &File.exists?/1) or
      newest_source(root) > oldest(outputs)
  end

  defp newest_source(root) do
    [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")]
    |> Kernel.++(Path.wildcard(Path.join(root, "native/*/Cargo.toml")))
    |> Kernel.++(Path.wildcard(Path.join(root, "native/*/{src,benches}/**/*.rs")))
    |> Kernel.++(Path.wildcard(Path.join(root, "native/*/build.rs")))
    |> Kernel.++(Path.wildcard(Path.join(root, "native/*/proto/*.proto")))
    |> Enum.map(&mtime/1)
    |> Enum.max(fn -> 0 end)
  end

  defp oldest(paths), do: paths |> Enum.map(&mtime/1) |> Enum.min()

  defp mtime(path) do
    case File.stat(path, time: :posix) do
      {:ok, %{mtime: t}} -> t
      _ -> 0
    end
  end

  defp build(root, priv) do
    cargo = System.find_executable("cargo") || Path.expand("~/.cargo/bin/cargo")

    args = [
      "build",
      "--release",
      "--locked",
      "-p",
      "dspex_nif",
      "-p",
      "dspex_port",
      "-p",
      "dspex_grpc"
    ]

    args = if File.exists?(Path.join(root, "Cargo.lock")), do: args, else: args -- ["--locked"]
    Mix.shell().info("==> dspex_bridge: cargo #{Enum.join(args, " ")}")

    case System.cmd(cargo, args, cd: root, stderr_to_stdout: true, into: IO.stream()) do
      {_, 0} -> place(root, priv)
      {_, status} -> fail("cargo exited with status #{status}")
    end
  rescue
    e in ErlangError -> fail("cannot run cargo: #{Exception.message(e)}")
  end

  defp place(root, priv) do
    target = System.get_env("CARGO_TARGET_DIR") || Path.join(root, "target")
    release = Path.join(Path.expand(target, root), "release")
    ensure_dir!(priv)

    missing =
      for {dest, candidates} <- @outputs,
          src = Enum.find(candidates, &File.exists?(Path.join(release, &1))),
          src == nil or copy(Path.join(release, src), Path.join(priv, dest)) != :ok,
          do: dest

    case missing do
      [] -> {:ok, []}
      _ -> fail("cargo did not produce #{Enum.join(missing, ", ")} in #{release}")
    end
  end

  # A `priv` left as a link to a source `priv/` that is gone (Mix links it
  # when the source has one) would make mkdir fail: replace it by a directory.
  defp ensure_dir!(dir) do
    parent = Path.dirname(dir)

    with {:ok, %{type: :symlink}} <- File.lstat(parent),
         false <- File.dir?(parent) do
      File.rm!(parent)
    end

    File.mkdir_p!(dir)
  end

  # Copy to a temporary name and rename, so a running VM that has the old
  # library mapped keeps a valid file.
  defp copy(src, dest) do
    tmp = dest <> ".tmp"

    with :ok <- File.cp(src, tmp),
         :ok <- File.chmod(tmp, 0o755) do
      File.rename(tmp, dest)
    end
  end

  defp fail(message) do
    Mix.shell().error("dspex_bridge: " <> message)

    {:error,
     [
       %Mix.Task.Compiler.Diagnostic{
         compiler_name: "dspex_cargo",
         file: "Cargo.toml",
         message: message,
         position: nil,
         severity: :error
       }
     ]}
  end
end
