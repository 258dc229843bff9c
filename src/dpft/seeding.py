"""Derived seeds: one integer per (stream seed, index), so each draw is reproducible on its own."""

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the seed space
_MASK = (1 << 63) - 1


def derive_seed(seed: int, index: int) -> int:
    return (seed * _MIX + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK
