defmodule DSPex.Bridge.SessionStoreTest do
  # Every SessionStore case, once per backend: see DSPex.Bridge.Conformance
  # test/support/conformance/session_store_cases.ex and batch_cases.ex.
  use ExUnit.Case, async: true

  use DSPex.Bridge.Conformance,
    cases: [
      DSPex.Bridge.Conformance.SessionStoreCases,
      DSPex.Bridge.Conformance.BatchCases,
      DSPex.Bridge.Conformance.FencingCases
    ]

  doctest DSPex.Bridge.SessionStore
end
