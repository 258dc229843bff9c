"""Noise for the private mechanisms, drawn from a source of its own (never the global RNG).

Two modes (`privacy.secure_mode`):
- default: a `torch.Generator` seeded from the experiment seed. Reproducible (a run, and a run resumed
  from a checkpoint, draws the same noise), which is what a benchmark needs; the guarantee then assumes
  the seed stays secret. Noise for many entries at once (`add_to`, DP-SGD's whole gradient) takes one
  seed from that generator per call and draws chunk c of tensor i from a generator seeded by (that seed,
  i, c), over threads (`dpft.seeding`): randn runs on one core, and OPT-125m's 85M entries took 0.44 s
  of a DP step on one thread, 0.20 s on two.
- secure: uniform bits from the operating system's CSPRNG (`os.urandom`), independent of the experiment
  seed and never stored in checkpoints (uniforms from 52 random bits each); Gaussian noise is the sum of four
  Box-Muller normals halved
  (the variance stays 1), as Opacus's secure mode does to blunt floating-point attacks on the sampler.
  Laplace noise is still drawn by floating-point inversion (not hardened against Mironov's attack).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from dpft.seeding import chunks, derive_seed, for_each, thread_generator

MECHANISMS = ("gaussian", "laplace", "none")


class NoiseSource:
    """Gaussian or Laplace noise of a given scale (std for Gaussian, b for Laplace).

    Laplace is sampled by inversion of a uniform draw, so the same uniform source serves both.
    """

    def __init__(self, mechanism: str, seed: int, device: torch.device | str = "cpu", secure: bool = False):
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown noise mechanism {mechanism!r}; valid: {MECHANISMS}")
        self.mechanism, self.secure = mechanism, secure
        self.generator = None if secure else torch.Generator(device=device).manual_seed(int(seed))

    # --- uniform and normal draws ---------------------------------------------------------------
    def _uniform(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 generator: torch.Generator | None) -> torch.Tensor:
        """U[0, 1) (secure: (k + 1/2)·2⁻⁵² from 52 random bits k, strictly inside (0, 1) and exact in float64)."""
        if not self.secure:
            return torch.rand(shape, generator=generator, dtype=dtype, device=device)
        count = math.prod(shape)
        bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(12)
        values = (bits.astype(np.float64) + 0.5) * 2.0**-52
        return torch.from_numpy(values).reshape(shape).to(device=device, dtype=dtype)

    def _normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                generator: torch.Generator | None) -> torch.Tensor:
        if not self.secure:
            return torch.randn(shape, generator=generator, dtype=dtype, device=device)
        total = torch.zeros(shape, dtype=torch.float64, device="cpu")  # the uniforms are on the CPU, whatever the default device
        for _ in range(4):  # Box-Muller on CSPRNG uniforms
            u1, u2 = self._uniform(shape, torch.float64, "cpu", None), self._uniform(shape, torch.float64, "cpu", None)
            total += torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return (total / 2).to(device=device, dtype=dtype)

    def sample(self, scale: float, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> torch.Tensor:
        return self._sample(scale, shape, dtype, device, self.generator)

    def _sample(self, scale: float, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                generator: torch.Generator | None) -> torch.Tensor:
        if self.mechanism == "none" or scale == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        if self.mechanism == "gaussian":
            return self._normal(shape, dtype, device, generator).mul_(scale)
        # in float64 whatever `dtype`: the clamp below 1/2 must be representable, or a uniform of 0 gives -inf
        u = self._uniform(shape, torch.float64, device, generator) - 0.5
        # |u| < 1/2 strictly, so the log stays finite
        return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 2.0**-54))).to(dtype)

    def add_to(self, tensors: list[torch.Tensor], scales: list[float]) -> None:
        """tensors[i] += noise of scale scales[i], in place; each tensor gets draws of its own.

        Seeded: one seed from the generator per call, chunk c of tensor i from (that seed, i, c), the chunks
        spread over threads. Secure: each tensor drawn in turn from the operating system's CSPRNG."""
        live = [(i, t, s) for i, (t, s) in enumerate(zip(tensors, scales)) if self.mechanism != "none" and s != 0]
        if not live:
            return
        if self.secure:
            for _, t, s in live:
                t.add_(self.sample(s, tuple(t.shape), t.dtype, t.device))
            return
        if not all(t.is_contiguous() for _, t, _ in live):
            raise ValueError("NoiseSource.add_to adds noise in place over each tensor's flat view: "
                             "pass contiguous tensors")
        seed = int(torch.randint(0, 1 << 62, (), generator=self.generator, device=self.generator.device))

        def one(i: int, flat: torch.Tensor, scale: float, c: int, part: slice) -> None:
            generator = thread_generator(flat.device, derive_seed(derive_seed(seed, i), c))
            flat[part].add_(self._sample(scale, (part.stop - part.start,), flat.dtype, flat.device, generator))

        items = [(i, t.view(-1), s, c, part) for i, t, s in live for c, part in enumerate(chunks(t.numel(), t.device))]
        for_each(one, items, sum(t.numel() for _, t, _ in live), (t.device for _, t, _ in live))

    # --- checkpoints: a secure source has no state to store (and must not leak one) --------------
    def state_dict(self) -> dict:
        state = {"mechanism": self.mechanism, "secure": self.secure}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if bool(state.get("secure", False)) != self.secure:
            raise ValueError("the checkpoint's noise was drawn with privacy.secure_mode="
                             f"{state.get('secure', False)}; resume with the same setting")
        if self.generator is not None:
            self.generator.set_state(state["generator"])
