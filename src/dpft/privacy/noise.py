"""Noise for the private mechanisms, drawn from a generator of its own (never the global RNG)."""

from __future__ import annotations

import torch


class NoiseSource:
    """Gaussian or Laplace noise of a given scale (std for Gaussian, b for Laplace).

    Laplace is sampled by inversion of a uniform draw, so the same generator serves both.
    """

    def __init__(self, mechanism: str, seed: int, device: torch.device | str = "cpu"):
        if mechanism not in ("gaussian", "laplace", "none"):
            raise ValueError(f"unknown noise mechanism {mechanism!r}")
        self.mechanism = mechanism
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def sample(self, scale: float, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> torch.Tensor:
        if self.mechanism == "none" or scale == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        if self.mechanism == "gaussian":
            return torch.randn(shape, generator=self.generator, dtype=dtype, device=device) * scale
        u = torch.rand(shape, generator=self.generator, dtype=dtype, device=device) - 0.5
        # |u| < 1/2 strictly, so the log stays finite
        return -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 2.0**-54))

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
