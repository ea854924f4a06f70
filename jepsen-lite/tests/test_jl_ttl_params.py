"""The ttl model's run parameters: ``late_ms`` (late side only) and ``origin_ns``."""

from __future__ import annotations

from jepsen_lite.checker import check_history
from jepsen_lite.checker.models import TTLRegisterModel, get_model
from jepsen_lite.history import Op
from jl_helpers import timed

MS = 1_000_000


def _history(read_at_ms: int, seen: object) -> list[Op]:
    return timed(
        (0, 0, "invoke", "write", {"value": "v", "ttl_ms": 1000}),
        (1 * MS, 0, "ok", "write", {"value": "v", "ttl_ms": 1000}),
        (read_at_ms * MS, 1, "invoke", "read", None),
        ((read_at_ms + 1) * MS, 1, "ok", "read", seen),
    )


def test_late_ms_allows_late_expiry_only() -> None:
    strict = TTLRegisterModel(epsilon_ms=50)
    lenient = TTLRegisterModel(epsilon_ms=50, late_ms=2500)
    # Seen 2 s after it should have expired: a violation unless lateness is allowed.
    late = _history(3000, "v")
    assert check_history(late, strict).valid is False
    assert check_history(late, lenient).valid is True
    # ... but not 3 s late.
    assert check_history(_history(4000, "v"), lenient).valid is False
    # Early expiry is never excused by late_ms.
    early = _history(500, None)
    assert check_history(early, lenient).valid is False


def test_model_params_from_a_header_and_relative_description() -> None:
    m = get_model("ttl", epsilon_ms=50, late_ms=2500, origin_ns=0)
    assert m.name == "ttl"
    text = TTLRegisterModel(origin_ns=1_000 * MS).describe_state(("v", 2_000 * MS, 3_500 * MS))
    assert text == "'v' (expires between +1.000 s and +2.500 s)"
