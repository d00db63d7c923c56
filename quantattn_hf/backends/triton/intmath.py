"""Launch arithmetic on the host in plain integers: `triton.cdiv` and `triton.next_power_of_2` are constexpr
functions whose Python wrapper cost ~13 us a call on the CI machine's CPU (timeit), many times per launch."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, and 0 for 0 (as triton.next_power_of_2)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()
