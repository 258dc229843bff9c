"""NoiseSource on its own: the noise's law, the seeded rule, the secure path's arithmetic, dtypes and devices,
and checkpoints.

Oracles: scipy.stats (Kolmogorov-Smirnov against norm/laplace); torch.rand/torch.randn from a torch.Generator
seeded with the source's seed (the seeded mode's published rule); and, for secure mode, os.urandom monkeypatched
to known bytes, from which the test computes the expected noise with Python's math module. Statistical checks
on the secure (unseeded) path reject with probability ≤ 1e-6 when the code is right.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch
from scipy import stats

from dpft.privacy import noise as noise_module
from dpft.privacy.noise import NoiseSource

N = 20_000
P_FALSE_ALARM = 1e-6


class FakeUrandom:
    """os.urandom replaced by a known byte stream; records how many bytes each call asked for."""

    def __init__(self, data: bytes | None = None, seed: int = 0):
        self.data = data
        self.rng = random.Random(seed)
        self.calls: list[int] = []
        self.stream = b""

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        out = self.data * (n // len(self.data)) if self.data is not None else self.rng.randbytes(n)
        self.stream += out
        return out


def uniforms(data: bytes) -> list[float]:
    """The secure rule by hand: each 8-byte word's top 52 bits k give (k + 1/2)·2^-52."""
    words = [int.from_bytes(data[i:i + 8], sys.byteorder) for i in range(0, len(data), 8)]
    return [((w >> 12) + 0.5) * 2.0**-52 for w in words]


def laplace_by_hand(u: float, b: float) -> float:
    """Inversion of Laplace(0, b) at uniform u: -b·sign(u - 1/2)·ln(1 - 2|u - 1/2|)."""
    v = u - 0.5
    return -b * math.copysign(1.0, v) * math.log1p(-2 * abs(v)) if v != 0 else 0.0


# --- construction and zero noise ---------------------------------------------------------------------
def test_an_unknown_mechanism_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown noise mechanism 'gauss'.*laplace"):
        NoiseSource("gauss", 0)


@pytest.mark.parametrize("secure", [False, True])
def test_mechanism_none_and_scale_zero_give_exact_zeros_and_scale_one_does_not(secure):
    """'none' returns zeros whatever the scale; a scale of 0 returns zeros for every mechanism; scale 1 is noise."""
    for mechanism, scale in [("none", 1.0), ("none", 2.5), ("gaussian", 0.0), ("laplace", 0)]:
        out = NoiseSource(mechanism, 0, secure=secure).sample(scale, (3, 4))
        assert out.shape == (3, 4) and out.dtype == torch.float64 and torch.equal(out, torch.zeros(3, 4).double())
    for mechanism in ("gaussian", "laplace"):
        assert NoiseSource(mechanism, 0, secure=secure).sample(1.0, (100,)).abs().min() > 0


# --- dtype, device, shape ----------------------------------------------------------------------------
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace", "none"])
def test_sample_returns_the_requested_dtype_device_and_shape(mechanism, secure, device):
    """Every path returns exactly the requested dtype and device (default float64 on the CPU). The meta device
    stands in for an accelerator on a CPU-only host: a path that drops `device` returns a CPU tensor instead."""
    source = NoiseSource(mechanism, 0, device="cuda" if device == "cuda" else "cpu", secure=secure)
    if device != "cuda":  # a seeded source draws on its generator's device
        default = source.sample(1.5, (2, 3))
        assert (default.dtype, default.device.type, default.shape) == (torch.float64, "cpu", (2, 3))
    for dtype in (torch.float32, torch.float64):
        for scale in (1.5, 0.0):
            out = source.sample(scale, (2, 3), dtype=dtype, device=device)
            assert (out.dtype, out.device.type, out.shape) == (dtype, torch.device(device).type, (2, 3))


# --- the seeded mode: torch's generator seeded with the seed -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_seeded_gaussian_is_randn_from_a_generator_seeded_with_the_seed(dtype):
    source = NoiseSource("gaussian", 1234)
    generator = torch.Generator().manual_seed(1234)
    for shape, scale in [((500,), 1.7), ((4, 5), 0.3)]:
        expected = torch.randn(shape, generator=generator, dtype=dtype) * scale
        assert torch.equal(source.sample(scale, shape, dtype=dtype), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_seeded_laplace_is_the_inverse_cdf_of_rand_from_a_generator_seeded_with_the_seed(dtype):
    """x = -b·sign(u - 1/2)·ln(1 - 2|u - 1/2|), u = float64 torch.rand from the seed whatever the dtype (computed
    here by hand), then rounded to the dtype."""
    source, generator, b = NoiseSource("laplace", 77), torch.Generator().manual_seed(77), 2.5
    got = source.sample(b, (2000,), dtype=dtype)
    u = torch.rand((2000,), generator=generator, dtype=torch.float64)
    expected = torch.tensor([laplace_by_hand(float(v), b) for v in u], dtype=torch.float64).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_seeded_noise_has_the_requested_law(mechanism):
    """Kolmogorov-Smirnov against N(0, σ²) / Laplace(0, b), seeded (deterministic); means 0 within 5 SE."""
    scale = 1.7
    draws = NoiseSource(mechanism, 5).sample(scale, (N,)).numpy()
    law = stats.norm(0, scale) if mechanism == "gaussian" else stats.laplace(0, scale)
    assert stats.kstest(draws, law.cdf).pvalue > P_FALSE_ALARM
    assert abs(draws.mean()) < 5 * law.std() / math.sqrt(N)


def test_laplace_maps_the_closed_ends_of_torch_rand_to_finite_values(monkeypatch):
    """torch.rand can return exactly 0 (then |u - 1/2| = 1/2 is clamped to 1/2 - 2^-54: x = -53·ln2·b, not -inf)
    and exactly 1/2 (x = 0, not NaN). The uniform draw is replaced by these values."""
    b = 3.0
    for value, expected in [(0.0, -53 * math.log(2) * b), (0.5, 0.0), (1 - 2.0**-53, 52 * math.log(2) * b)]:
        monkeypatch.setattr(NoiseSource, "_uniform", lambda self, shape, dtype, device, generator, v=value:
                            torch.full(shape, v, dtype=dtype, device=device))
        for secure in (False, True):
            out = NoiseSource("laplace", 0, secure=secure).sample(b, (3,))
            assert torch.isfinite(out).all(), (value, out)
            torch.testing.assert_close(out, torch.full((3,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_laplace_in_float32_stays_finite_at_the_ends_of_the_uniform(monkeypatch):
    """The clamp bound 1/2 - 2^-54 rounds to 1/2 below float64: the inversion runs in float64 whatever the dtype."""
    monkeypatch.setattr(noise_module.os, "urandom", FakeUrandom(bytes(8)))
    assert torch.isfinite(NoiseSource("laplace", 0, secure=True).sample(1.0, (3,), dtype=torch.float32)).all()


# --- secure mode: os.urandom, by hand ----------------------------------------------------------------
def test_secure_uniforms_are_52_random_bits_centred_strictly_inside_zero_one(monkeypatch):
    """Each word of 8 random bytes gives (k + 1/2)·2^-52 from its top 52 bits k: all-zero bytes give 2^-53 > 0."""
    monkeypatch.setattr(noise_module.os, "urandom", FakeUrandom(bytes(8)))
    low = NoiseSource("gaussian", 0, secure=True)._uniform((4,), torch.float64, "cpu", None)
    assert torch.equal(low, torch.full((4,), 2.0**-53, dtype=torch.float64))
    fake = FakeUrandom(seed=3)
    monkeypatch.setattr(noise_module.os, "urandom", fake)
    values = NoiseSource("gaussian", 0, secure=True)._uniform((2, 50), torch.float64, "cpu", None)
    assert fake.calls == [800] and values.flatten().tolist() == uniforms(fake.stream)


def test_secure_uniforms_stay_below_one(monkeypatch):
    """With 53 bits, (2^53 - 1) + 1/2 rounded to 2^53: all-one bits gave exactly 1.0."""
    monkeypatch.setattr(noise_module.os, "urandom", FakeUrandom(b"\xff" * 8))
    assert NoiseSource("gaussian", 0, secure=True)._uniform((1,), torch.float64, "cpu", None).item() < 1


@pytest.mark.parametrize("data", [None, bytes(8), b"\xff" * 8])
def test_secure_gaussian_is_four_box_muller_normals_halved_from_os_urandom(monkeypatch, data):
    """By hand from the bytes: Σ_{r<4} sqrt(-2 ln u1_r)·cos(2π u2_r) / 2, u1_r and u2_r from successive urandom
    calls; the seed plays no part (two seeds, same bytes, same noise)."""
    shape, scale = (3, 7), 1.3
    n = math.prod(shape)
    outs = []
    for seed in (0, 99):
        fake = FakeUrandom(data, seed=11)
        monkeypatch.setattr(noise_module.os, "urandom", fake)
        outs.append(NoiseSource("gaussian", seed, secure=True).sample(scale, shape))
        assert fake.calls == [8 * n] * 8
    u = uniforms(fake.stream)
    rounds = [(u[2 * r * n:(2 * r + 1) * n], u[(2 * r + 1) * n:(2 * r + 2) * n]) for r in range(4)]
    expected = [scale * sum(math.sqrt(-2 * math.log(u1[j])) * math.cos(2 * math.pi * u2[j]) for u1, u2 in rounds) / 2
                for j in range(n)]
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("data", [None, bytes(8)])
def test_secure_laplace_inverts_uniforms_from_os_urandom(monkeypatch, data):
    fake = FakeUrandom(data, seed=5)
    monkeypatch.setattr(noise_module.os, "urandom", fake)
    b = 0.7
    out = NoiseSource("laplace", 0, secure=True).sample(b, (500,))
    expected = [laplace_by_hand(v, b) for v in uniforms(fake.stream)]
    assert fake.calls == [4000]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_secure_noise_has_the_requested_law_and_consecutive_draws_are_uncorrelated(mechanism):
    """Real os.urandom: KS against N(0, σ²) / Laplace(0, b) (p > 1e-6) and lag-1 correlation |r|·√n < 5.3
    (two-sided normal tail 1.2e-7): each rejects a correct source with probability ≤ 1e-6."""
    scale = 1.0  # scale 1 too must be noise
    draws = NoiseSource(mechanism, 5, secure=True).sample(scale, (N,)).numpy()
    law = stats.norm(0, scale) if mechanism == "gaussian" else stats.laplace(0, scale)
    assert stats.kstest(draws, law.cdf).pvalue > P_FALSE_ALARM
    r = stats.pearsonr(draws[:-1], draws[1:]).statistic
    assert abs(r) * math.sqrt(N - 1) < 5.3


# --- checkpoints -------------------------------------------------------------------------------------
def test_a_seeded_source_resumes_identically_from_its_state_dict():
    source = NoiseSource("gaussian", 3)
    source.sample(1.0, (10,))
    state = source.state_dict()
    assert state["secure"] is False and "generator" in state
    restored = NoiseSource("gaussian", 42)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(1.0, (50,)), source.sample(1.0, (50,)))


def test_a_secure_source_stores_no_generator_and_loads_its_own_checkpoint():
    source = NoiseSource("laplace", 3, secure=True)
    state = source.state_dict()
    assert state["secure"] is True and "generator" not in state
    NoiseSource("laplace", 4, secure=True).load_state_dict(state)


def test_a_checkpoint_drawn_with_the_other_secure_mode_is_refused_naming_its_setting():
    with pytest.raises(ValueError, match=r"privacy\.secure_mode=True; resume with the same setting"):
        NoiseSource("gaussian", 0).load_state_dict(NoiseSource("gaussian", 0, secure=True).state_dict())
    with pytest.raises(ValueError, match=r"privacy\.secure_mode=False; resume with the same setting"):
        NoiseSource("gaussian", 0, secure=True).load_state_dict(NoiseSource("gaussian", 0).state_dict())


def test_a_checkpoint_written_before_secure_mode_loads_as_seeded():
    """Checkpoints from before secure mode hold {mechanism, generator} only: they are seeded ones."""
    source = NoiseSource("gaussian", 8)
    legacy = {"mechanism": "gaussian", "generator": source.generator.get_state()}
    restored = NoiseSource("gaussian", 9)
    restored.load_state_dict(legacy)
    assert torch.equal(restored.sample(1.0, (20,)), source.sample(1.0, (20,)))
    with pytest.raises(ValueError, match=r"privacy\.secure_mode=False;"):
        NoiseSource("gaussian", 0, secure=True).load_state_dict(legacy)


def test_add_to_follows_its_published_rule_in_each_tensors_dtype(monkeypatch):
    """Seeded add_to: one seed s = randint(0, 2^62) from the source's generator per call; chunk c of tensor i drawn
    as randn in that tensor's dtype from a generator seeded by derive_seed(derive_seed(s, i), c). Re-drawn here from
    torch.Generator directly, with small chunks so every tensor has several; a scale of 1 is noise too."""
    from dpft import seeding

    monkeypatch.setattr(seeding, "CHUNK", 7)
    tensors = [torch.zeros(20, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float32), torch.zeros(4)]
    scales = [1.0, 2.5, 0.0]
    NoiseSource("gaussian", 41).add_to(tensors, scales)
    seed = int(torch.randint(0, 1 << 62, (), generator=torch.Generator().manual_seed(41)))
    for i, (t, scale) in enumerate(zip(tensors, scales)):
        expected = torch.zeros(t.numel(), dtype=t.dtype)
        for c, start in enumerate(range(0, t.numel(), 7)):
            part = slice(start, min(start + 7, t.numel()))
            generator = torch.Generator().manual_seed(seeding.derive_seed(seeding.derive_seed(seed, i), c))
            expected[part] = torch.randn(part.stop - part.start, generator=generator, dtype=t.dtype) * scale
        if scale == 0:
            assert torch.equal(t, torch.zeros_like(t))  # no noise, and no draw for it
        else:
            assert torch.equal(t.flatten(), expected), i


def test_noise_that_adds_nothing_draws_nothing():
    """All scales 0 (or mechanism none): the tensors are unchanged and the seeded stream is not advanced, so the
    next call draws what a fresh source would."""
    used, fresh = NoiseSource("gaussian", 8), NoiseSource("gaussian", 8)
    zeros = [torch.zeros(5), torch.zeros(2, 2)]
    used.add_to(zeros, [0.0, 0.0])
    assert all(torch.equal(t, torch.zeros_like(t)) for t in zeros)
    a, b = torch.zeros(6), torch.zeros(6)
    used.add_to([a], [1.0])
    fresh.add_to([b], [1.0])
    assert torch.equal(a, b)


def test_secure_gaussian_is_summed_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):
        noise = NoiseSource("gaussian", 0, secure=True).sample(1.0, (3,), device="cpu")
    assert noise.device.type == "cpu" and torch.isfinite(noise).all()
