defmodule DSPex.Bridge.Backup.Archive do
  @moduledoc false
  # One backup file: a header naming the session and the time, the length
  # and SHA-256 of what follows, then the session's snapshot
  # (`SessionStore.export_session/1`).
  #
  #   "DSPEXBAK" | format u16 | taken_at i64 (µs since the epoch)
  #   | sid_len u16 | sid | payload_len u64 | sha256 (32 bytes) | payload
  #
  # Integers are big-endian. The digest covers every header field before
  # it and the payload, so a changed session id or time fails the check as
  # a changed byte of the snapshot does. A file is accepted only when its
  # size is exactly the header's plus `payload_len`: a truncated file, or
  # one with bytes appended, is refused before the digest is computed.
  #
  # Files are named `<name>--<hash>--<time>.dspex-backup`: `name` is the
  # session id with every byte outside `[A-Za-z0-9_-]` replaced by `_`, cut
  # to 64 bytes (for people), `hash` the first 12 hex digits of the id's
  # SHA-256 (for uniqueness: ids differ where names do not), `time` UTC to
  # the microsecond (`20250102T030405.678901Z`), so the names of one
  # session sort in time order. Files are written under a hidden temporary
  # name (`.<name>.tmp-<unique>`), fsynced, renamed, and the directory is
  # fsynced: a crash at any point leaves either the complete file under
  # its final name or no file under that name.

  @magic "DSPEXBAK"
  @format 1
  @suffix ".dspex-backup"
  @tmp_marker ".tmp-"
  # Snapshots are at most 256 MiB (the engine refuses larger imports); a
  # header is at most 8 + 2 + 8 + 2 + 255·4 + 8 + 32 bytes.
  @max_header 1_100
  @max_payload 256 * 1024 * 1024

  @type header :: %{
          session_id: String.t(),
          taken_at: integer,
          payload_bytes: non_neg_integer,
          sha256: binary
        }

  @doc false
  def suffix, do: @suffix

  @doc false
  def max_payload, do: @max_payload

  @doc "The file's whole content for `payload`, exported from `sid` at `taken_at` (µs)."
  @spec encode(String.t(), integer, binary) :: iodata
  def encode(sid, taken_at, payload) do
    head = [
      @magic,
      <<@format::16, taken_at::signed-64, byte_size(sid)::16>>,
      sid,
      <<byte_size(payload)::64>>
    ]

    digest = :crypto.hash_final(:crypto.hash_update(:crypto.hash_update(sha(), head), payload))
    [head, digest, payload]
  end

  defp sha, do: :crypto.hash_init(:sha256)

  @doc "The prefix every backup file of `sid` starts with."
  @spec prefix(String.t()) :: String.t()
  def prefix(sid) do
    readable =
      sid
      |> :binary.bin_to_list()
      |> Enum.map(fn c ->
        if c in ?a..?z or c in ?A..?Z or c in ?0..?9 or c in [?_, ?-], do: c, else: ?_
      end)
      |> Enum.take(64)
      |> List.to_string()

    hash = :crypto.hash(:sha256, sid) |> Base.encode16(case: :lower) |> binary_part(0, 12)
    readable <> "--" <> hash <> "--"
  end

  @doc "The file name of `sid`'s backup taken at `taken_at` (µs)."
  @spec file_name(String.t(), integer) :: String.t()
  def file_name(sid, taken_at), do: prefix(sid) <> format_time(taken_at) <> @suffix

  @doc "A temporary name beside the final one (hidden, never listed)."
  @spec tmp_name(String.t()) :: String.t()
  def tmp_name(sid),
    do: "." <> prefix(sid) <> @tmp_marker <> Integer.to_string(System.unique_integer([:positive]))

  @doc "Is `name` a temporary file of `sid` (left by a crash)?"
  def tmp_of?(name, sid), do: String.starts_with?(name, "." <> prefix(sid) <> @tmp_marker)

  @doc "Is `name` the name of a backup file (of any session)?"
  def backup_name?(name),
    do: String.ends_with?(name, @suffix) and not String.starts_with?(name, ".")

  defp format_time(us) do
    dt = DateTime.from_unix!(us, :microsecond)

    :io_lib.format("~4..0B~2..0B~2..0BT~2..0B~2..0B~2..0B.~6..0BZ", [
      dt.year,
      dt.month,
      dt.day,
      dt.hour,
      dt.minute,
      dt.second,
      elem(dt.microsecond, 0)
    ])
    |> IO.iodata_to_binary()
  end

  @doc """
  Reads and checks the header only (the first bytes of the file):
  `{:ok, header}` or `{:error, reason}`.
  """
  @spec read_header(Path.t()) :: {:ok, header} | {:error, term}
  def read_header(path) do
    with {:ok, fd} <- open(path) do
      try do
        case :file.pread(fd, 0, @max_header) do
          {:ok, bytes} -> with {:ok, header, _rest} <- parse_header(bytes), do: {:ok, header}
          :eof -> {:error, {:corrupt_backup, :empty}}
          {:error, reason} -> {:error, {:read_failed, reason}}
        end
      after
        :file.close(fd)
      end
    end
  end

  @doc """
  Reads a whole file and checks it: `{:ok, header, payload}` when the magic,
  the format, the length and the digest are right; else `{:error, reason}`
  with `reason` one of `{:corrupt_backup, why}` (`:bad_magic`,
  `{:unknown_format, n}`, `:truncated`, `{:trailing_bytes, n}`,
  `:checksum_mismatch`, `:empty`), `{:too_large, bytes}`, `{:not_a_file,
  type}`, `{:read_failed, posix}`.
  """
  @spec read(Path.t()) :: {:ok, header, binary} | {:error, term}
  def read(path) do
    with {:ok, bytes} <- read_bytes(path), do: decode(bytes)
  end

  @doc "A whole file's bytes, refused beyond the largest valid size."
  @spec read_bytes(Path.t()) :: {:ok, binary} | {:error, term}
  def read_bytes(path) do
    with {:ok, %File.Stat{type: :regular, size: size}} <- stat(path),
         :ok <- check_size(size),
         do: read_file(path)
  end

  @doc "Checks a whole file's bytes, as `read/1` does."
  @spec decode(binary) :: {:ok, header, binary} | {:error, term}
  def decode(bytes) when is_binary(bytes) do
    with :ok <- check_size(byte_size(bytes)),
         {:ok, header, rest} <- parse_header(bytes),
         {:ok, payload} <- take_payload(rest, header.payload_bytes),
         :ok <- check_digest(bytes, header, payload) do
      {:ok, header, payload}
    end
  end

  def decode(_other), do: {:error, {:corrupt_backup, :bad_magic}}

  defp stat(path) do
    case File.stat(path) do
      {:ok, %File.Stat{type: :regular}} = ok -> ok
      {:ok, %File.Stat{type: type}} -> {:error, {:not_a_file, type}}
      {:error, :enoent} -> {:error, {:no_such_file, path}}
      {:error, reason} -> {:error, {:read_failed, reason}}
    end
  end

  defp check_size(size) when size > @max_payload + @max_header, do: {:error, {:too_large, size}}
  defp check_size(_size), do: :ok

  defp read_file(path) do
    case File.read(path) do
      {:ok, bytes} -> {:ok, bytes}
      {:error, reason} -> {:error, {:read_failed, reason}}
    end
  end

  defp open(path) do
    case :file.open(path, [:read, :raw, :binary]) do
      {:ok, fd} -> {:ok, fd}
      {:error, :enoent} -> {:error, {:no_such_file, path}}
      {:error, :eisdir} -> {:error, {:not_a_file, :directory}}
      {:error, reason} -> {:error, {:read_failed, reason}}
    end
  end

  defp parse_header(<<@magic, @format::16, taken_at::signed-64, sid_len::16, rest::binary>>) do
    case rest do
      <<sid::binary-size(sid_len), payload_len::64, digest::binary-32, payload::binary>> ->
        if String.valid?(sid) and sid != "" do
          header = %{
            session_id: sid,
            taken_at: taken_at,
            payload_bytes: payload_len,
            sha256: digest
          }

          {:ok, header, payload}
        else
          {:error, {:corrupt_backup, :bad_session_id}}
        end

      _ ->
        {:error, {:corrupt_backup, :truncated}}
    end
  end

  defp parse_header(<<@magic, format::16, _::binary>>) when format != @format,
    do: {:error, {:corrupt_backup, {:unknown_format, format}}}

  defp parse_header(<<@magic, _::binary>>), do: {:error, {:corrupt_backup, :truncated}}
  defp parse_header(<<>>), do: {:error, {:corrupt_backup, :empty}}

  # A file cut inside the magic itself.
  defp parse_header(bytes) when byte_size(bytes) < byte_size(@magic) do
    if String.starts_with?(@magic, bytes),
      do: {:error, {:corrupt_backup, :truncated}},
      else: {:error, {:corrupt_backup, :bad_magic}}
  end

  defp parse_header(_bytes), do: {:error, {:corrupt_backup, :bad_magic}}

  defp take_payload(rest, len) when byte_size(rest) == len, do: {:ok, rest}

  defp take_payload(rest, len) when byte_size(rest) < len,
    do: {:error, {:corrupt_backup, :truncated}}

  defp take_payload(rest, len),
    do: {:error, {:corrupt_backup, {:trailing_bytes, byte_size(rest) - len}}}

  defp check_digest(bytes, header, payload) do
    head_len = byte_size(bytes) - byte_size(payload) - 32
    head = binary_part(bytes, 0, head_len)

    if :crypto.hash(:sha256, [head, payload]) == header.sha256,
      do: :ok,
      else: {:error, {:corrupt_backup, :checksum_mismatch}}
  end

  @doc """
  Writes `content` to `dir/name` atomically: a temporary file in `dir`,
  written and fsynced, renamed over `name`, then `dir` fsynced. On an error
  the temporary file is removed and `{:error, reason}` returned.
  """
  @spec write_atomic(Path.t(), String.t(), String.t(), iodata) :: :ok | {:error, term}
  def write_atomic(dir, tmp_name, name, content) do
    tmp = Path.join(dir, tmp_name)
    final = Path.join(dir, name)

    result =
      with {:ok, fd} <- open_new(tmp),
           :ok <- write_and_sync(fd, content),
           :ok <- rename(tmp, final) do
        sync_dir(dir)
      end

    if result != :ok, do: File.rm(tmp)
    result
  end

  defp open_new(path) do
    case :file.open(path, [:write, :raw, :binary, :exclusive]) do
      {:ok, fd} -> {:ok, fd}
      {:error, reason} -> {:error, {:write_failed, reason}}
    end
  end

  defp write_and_sync(fd, content) do
    with :ok <- :file.write(fd, content),
         :ok <- :file.sync(fd) do
      :file.close(fd)
    else
      {:error, reason} ->
        :file.close(fd)
        {:error, {:write_failed, reason}}
    end
  end

  defp rename(from, to) do
    case :file.rename(from, to) do
      :ok -> :ok
      {:error, reason} -> {:error, {:write_failed, reason}}
    end
  end

  @doc """
  fsyncs a directory, so a rename or an unlink in it is on disk. OTP opens
  no directories, so coreutils' `sync DIR` (`fsync(2)` of the directory,
  coreutils >= 8.24) does it; without a `sync` program the rename is left
  to the file system's own commit (seconds on ext4).
  """
  @spec sync_dir(Path.t()) :: :ok | {:error, term}
  def sync_dir(dir) do
    case sync_program() do
      nil ->
        :ok

      sync ->
        case System.cmd(sync, [dir], stderr_to_stdout: true) do
          {_, 0} -> :ok
          {out, status} -> {:error, {:fsync_dir_failed, status, String.trim(out)}}
        end
    end
  end

  defp sync_program do
    case :persistent_term.get({__MODULE__, :sync}, :unknown) do
      :unknown ->
        found = System.find_executable("sync")
        :persistent_term.put({__MODULE__, :sync}, found)
        found

      found ->
        found
    end
  end
end
