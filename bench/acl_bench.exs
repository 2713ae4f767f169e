# Access control: checking a permission against 10 rules, and what the
# check adds to a read, each beside its baseline, in one run.
#
#   MIX_ENV=prod mix run bench/acl_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule AclBench.SeedAccessControl do
  @moduledoc """
  The seed's `check_permission/4` (../shared/seeds/002, section 3), as
  written: every string pattern becomes a regex compiled on every call (and,
  unanchored, `"admin_*"` also matches `"not_admin_1"`).
  """
  def check_permission(variable, session_id, permission, context \\ %{}) do
    owner_session = Map.get(variable.metadata, :owner_session, variable.metadata[:created_by])

    cond do
      session_id == owner_session -> :ok
      has_permission?(variable.access_rules || [], session_id, permission, context) -> :ok
      true -> {:error, :access_denied}
    end
  end

  defp has_permission?([], _session_id, _permission, _context), do: false

  defp has_permission?([rule | rest], session_id, permission, context) do
    if matches_rule?(rule, session_id, permission, context) do
      true
    else
      has_permission?(rest, session_id, permission, context)
    end
  end

  defp matches_rule?(rule, session_id, permission, context) do
    session_matches?(rule.session_pattern, session_id) and
      permission in rule.permissions and
      conditions_match?(rule.conditions, context)
  end

  defp session_matches?(:any, _session_id), do: true

  defp session_matches?(pattern, session_id) when is_binary(pattern) do
    case pattern do
      "*" ->
        true

      _ ->
        regex =
          pattern
          |> String.replace("*", ".*")
          |> Regex.compile!()

        Regex.match?(regex, session_id)
    end
  end

  defp conditions_match?(conditions, _context) when map_size(conditions) == 0, do: true

  defp conditions_match?(conditions, context) do
    Enum.all?(conditions, fn {key, expected} -> Map.get(context, key) == expected end)
  end
end

defmodule AclBench do
  alias DSPex.Bridge.SessionStore

  @sid "bench-acl"

  # Ten rules; the principal is granted by the last one, so every rule is
  # looked at (the seed stops at the first match, as ours does).
  def rules do
    for(
      i <- 1..9,
      do: %{session_pattern: "team#{i}_*", permissions: [:read, :write], conditions: %{}}
    ) ++
      [%{session_pattern: "admin_*", permissions: [:read, :write, :optimize], conditions: %{}}]
  end

  def variable, do: %{id: "var_1", metadata: %{owner_session: "owner"}, access_rules: rules()}

  def setup do
    {:ok, _} = SessionStore.create_session(@sid)
    {:ok, _} = SessionStore.register_variable(@sid, :open, :float, 0.5)
    {:ok, _} = SessionStore.register_variable(@sid, :guarded, :float, 0.5, access_rules: rules())
  end

  def read_open, do: SessionStore.get_variable_value(@sid, :open)

  def read_guarded,
    do: SessionStore.get_variable_value(@sid, :guarded, nil, principal: "admin_ops")
end

alias AclBench.SeedAccessControl, as: Seed
alias DSPex.Bridge.AccessControl

AclBench.setup()
opts = [time: 3, warmup: 1]

# Both implementations get the same map, bound in the closure; same answers
# before timing anything.
variable = AclBench.variable()
:ok = AccessControl.check_permission(variable, "admin_ops", :write)
:ok = Seed.check_permission(variable, "admin_ops", :write)
{:error, :access_denied} = AccessControl.check_permission(variable, "guest", :write)
{:error, :access_denied} = Seed.check_permission(variable, "guest", :write)
0.5 = AclBench.read_guarded()

checks =
  DSPex.Bench.run(
    %{
      "check_permission/4, 10 rules, granted by the 10th" => fn ->
        AccessControl.check_permission(variable, "admin_ops", :write)
      end,
      "seed regex-per-call, 10 rules, granted by the 10th" => fn ->
        Seed.check_permission(variable, "admin_ops", :write)
      end,
      "check_permission/4, 10 rules, denied" => fn ->
        AccessControl.check_permission(variable, "guest", :write)
      end,
      "seed regex-per-call, 10 rules, denied" => fn ->
        Seed.check_permission(variable, "guest", :write)
      end
    },
    [title: "check_permission/4 on a variable map with 10 rules"] ++ opts
  )

reads =
  DSPex.Bench.run(
    %{
      "read, no rules (the session itself)" => &AclBench.read_open/0,
      "read as admin_ops, 10 rules (enforced)" => &AclBench.read_guarded/0
    },
    [title: "get_variable_value: the cost of enforcement"] ++ opts
  )

IO.puts("\n## ratios\n")

granted =
  DSPex.Bench.ratio(
    checks,
    "check_permission/4, 10 rules, granted by the 10th",
    "seed regex-per-call, 10 rules, granted by the 10th"
  )

denied =
  DSPex.Bench.ratio(
    checks,
    "check_permission/4, 10 rules, denied",
    "seed regex-per-call, 10 rules, denied"
  )

read_cost =
  reads["read, no rules (the session itself)"].ips /
    reads["read as admin_ops, 10 rules (enforced)"].ips

IO.puts("an enforced read with 10 rules costs #{Float.round(read_cost, 2)}x a read with none")

IO.puts("""

| case | measured | target |
| --- | --- | --- |
| check_permission/4, 10 rules, granted, vs seed | #{Float.round(granted, 1)}x faster | >= 50x |
| check_permission/4, 10 rules, denied, vs seed | #{Float.round(denied, 1)}x faster | >= 50x |
| enforced read (10 rules) vs read with none | #{Float.round(read_cost, 2)}x the cost | <= 1.3x |
""")
