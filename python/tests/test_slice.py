"""The vertical slice: register, get, set through the real server."""
import pytest

from dspex_bridge import VariableNotFoundError, VersionMismatchError


def test_register_get_set(ctx):
    vid = ctx.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    assert vid.startswith("var_temperature_")
    assert ctx.get_variable("temperature") == 0.7
    assert ctx.update_variable("temperature", 0.9) == 1
    assert ctx["temperature"] == 0.9
    assert ctx.v.temperature == 0.9


def test_expected_version(ctx):
    ctx.register_variable("k", "integer", 1)
    assert ctx.update_variable("k", 2, expected_version=0) == 1
    with pytest.raises(VersionMismatchError) as e:
        ctx.update_variable("k", 3, expected_version=0)
    assert e.value.current_version == 1


def test_unknown_variable(ctx):
    with pytest.raises(VariableNotFoundError):
        ctx.get_variable("nope")
    assert ctx.get_variable("nope", None) is None
