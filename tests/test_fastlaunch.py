"""Launch-plan signatures (quantattn_hf/backends/triton/fastlaunch.py): what makes two launches share a plan; and
the host launch arithmetic (intmath.py).

The fast path itself needs a GPU (tests/test_triton.py, `gpu` marks); here the keys are checked on the CPU
against a plain JITFunction, built without the interpreter's wrapping.
"""

import types

import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from quantattn_hf.backends.triton import fastlaunch  # noqa: E402


def _kernel(X, n, stride, length, BLOCK: tl.constexpr):
    pass


@pytest.fixture
def cache(monkeypatch):
    monkeypatch.setattr(fastlaunch.LaunchCache, "enabled", True)
    active = types.SimpleNamespace(get_current_device=lambda: 0)  # no GPU driver on the CPU
    monkeypatch.setattr(fastlaunch, "driver", types.SimpleNamespace(active=active))
    return fastlaunch.LaunchCache(JITFunction(_kernel), varying=("length",), varying_mod16=("stride",))


def test_plan_key_separates_what_compiled_code_depends_on(cache):
    x = torch.randn(64)
    key = cache._signature((x, 7, 32, 100), {"BLOCK": 16})
    assert key == cache._signature((torch.randn(64), 7, 32, 100), {"BLOCK": 16})  # other data, same plan
    assert key != cache._signature((x, 8, 32, 100), {"BLOCK": 16})  # an exact integer
    assert key != cache._signature((x, 7, 32, 100), {"BLOCK": 32})  # a constexpr
    assert key != cache._signature((x.half(), 7, 32, 100), {"BLOCK": 16})  # a dtype
    assert key != cache._signature((x[1:], 7, 32, 100), {"BLOCK": 16})  # pointer alignment (4 bytes off)


def test_varying_integers_share_a_plan_within_their_class(cache):
    x = torch.randn(64)
    key = cache._signature((x, 7, 32, 101), {"BLOCK": 16})
    assert key == cache._signature((x, 7, 32, 102), {"BLOCK": 16})  # length: Triton's classes only
    assert key != cache._signature((x, 7, 32, 112), {"BLOCK": 16})  # divisible by 16
    assert key != cache._signature((x, 7, 32, 1), {"BLOCK": 16})  # == 1
    assert key != cache._signature((x, 7, 32, 2**31), {"BLOCK": 16})  # 64-bit
    assert key == cache._signature((x, 7, 64, 101), {"BLOCK": 16})  # stride: same value mod 16
    assert key != cache._signature((x, 7, 34, 101), {"BLOCK": 16})  # word alignment differs


def test_disabled_cache_is_a_plain_launch(monkeypatch):
    monkeypatch.setattr(fastlaunch.LaunchCache, "enabled", False)
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    fastlaunch.LaunchCache(Kernel())((3,), 1, 2, BLOCK=4)
    assert calls == [((3,), (1, 2), {"BLOCK": 4})]


def test_host_launch_arithmetic_is_tritons():
    """intmath's cdiv and next_power_of_2 (plain integers, for per-launch host arithmetic) give Triton's values."""
    import triton

    from quantattn_hf.backends.triton import intmath

    for n in [*range(0, 4100), 2**31 - 1, 2**31, 2**40 + 3]:
        assert intmath.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 127):
            assert intmath.cdiv(n, d) == triton.cdiv(n, d), (n, d)
