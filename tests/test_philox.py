"""The Philox z kernel: the published generator, the documented layout, standard normal values, and a
process whose float mode it leaves alone."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch

from dpft import philox
from dpft.methods.zeroth_order import ZerothOrderSGD
from tests.conftest import requires_data

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_the_kernel_is_philox4x32_10(counter, key, expected):
    assert philox.philox4x32_10(counter, key) == expected


def _reference(key: int, offset: int, n: int) -> np.ndarray:
    """The layout of philox.c written independently in numpy (float64 transcendental functions): entry
    64g + 32w + 16h + j is the cos (h = 0) or sin (h = 1) of Box–Muller on words 2w, 2w+1 of block 16g + j."""
    entries = np.arange(offset, offset + n, dtype=np.uint64)
    g, rest = entries // 64, entries % 64
    w, h, j = rest // 32, (rest % 32) // 16, rest % 16
    block = 16 * g + j
    mask = np.uint64(0xFFFFFFFF)
    c = [block & mask, block >> np.uint64(32), np.zeros_like(block), np.zeros_like(block)]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    words = np.stack(c)  # [4, n]
    w, columns = w.astype(np.int64), np.arange(n)
    first, second = words[2 * w, columns], words[2 * w + 1, columns]
    u = ((first >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24
    v = (second >> np.uint64(8)).astype(np.float64) * 2.0 ** -24
    radius, angle = np.sqrt(-2 * np.log(u)), 2 * math.pi * v
    return np.where(h == 0, radius * np.cos(angle), radius * np.sin(angle))


@pytest.mark.parametrize("key,offset,n", [(0, 0, 64), (123456789, 1000, 777), (2 ** 63 - 25, (1 << 33) + 3, 200)])
def test_values_follow_the_documented_layout(key, offset, n):
    z = philox.normal_(torch.empty(n), key, offset)
    np.testing.assert_allclose(z.numpy(), _reference(key, offset, n), rtol=0, atol=2e-5)


def test_any_range_is_the_same_entries_of_a_longer_draw():
    whole = philox.normal_(torch.empty(5000), 7, 0)
    for offset, n in [(0, 20), (5, 1000), (10, 54), (63, 130), (128, 64), (64, 0), (4999, 1)]:
        assert torch.equal(philox.normal_(torch.empty(n), 7, offset), whole[offset:offset + n])
        theta = torch.linspace(-1, 1, n)
        expected = theta + 0.25 * whole[offset:offset + n]
        torch.testing.assert_close(philox.add_normal_(theta, 7, offset, 0.25), expected, rtol=0, atol=1e-6)


def test_entries_are_standard_normal_and_uncorrelated():
    z = philox.normal_(torch.empty(1 << 20), 99, 0).double()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 4 * math.sqrt(15 / n) and abs((z ** 4).mean() - 3) < 4 * math.sqrt(96 / n)
    # Kolmogorov–Smirnov against Φ: the 0.1% critical value is 1.95/√n
    ordered = z.sort().values
    cdf = 0.5 * (1 + torch.erf(ordered / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert max((grid - cdf).abs().max(), (cdf - grid + 1 / n).abs().max()) < 1.95 / math.sqrt(n)
    # neighbours within a group (cos and sin of one pair, and across pairs), across groups and across keys
    other = philox.normal_(torch.empty(n), 100, 0).double()
    for a, b in [(z[:-1], z[1:]), (z[:-16], z[16:]), (z[:-32], z[32:]), (z[:-64], z[64:]), (z, other)]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 4 / math.sqrt(n)
    # the cos and sin of one pair are uncorrelated, yet their squares sum to -2 log u: check they are not identical
    pairs = z.view(-1, 2, 16)
    assert abs(torch.corrcoef(torch.stack([pairs[:, 0].flatten() ** 2, pairs[:, 1].flatten() ** 2]))[0, 1]) < 0.05


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """-ffast-math at link time would set flush-to-zero for the whole process (crtfastmath.o)."""
    philox.kernel()
    tiny = torch.full((64,), 1e-40)  # a float32 subnormal
    assert (tiny * 1.0 > 0).all() and (tiny + 0.0 > 0).all()
    assert np.float32(1e-40) * np.float32(1.0) > 0


def test_without_a_compiler_philox_fails_clearly_and_torch_still_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("DPFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(philox, "_lib", None)
    monkeypatch.setattr(philox, "_error", None)
    params = [torch.nn.Parameter(torch.zeros(10))]
    with pytest.raises(philox.KernelUnavailable, match="no C compiler.*method.z_generator=torch"):
        ZerothOrderSGD(params, lr=0.1, z_generator="philox")
    opt = ZerothOrderSGD(params, lr=0.1, z_generator="torch")
    opt.step(lambda: params[0].sum().view(1))
    assert params[0].abs().sum() > 0


def _fresh_kernel(monkeypatch, cache, compiler):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("DPFT_CACHE_DIR", str(cache))
    monkeypatch.setattr(philox, "_lib", None)
    monkeypatch.setattr(philox, "_error", None)


def test_a_kernel_built_before_is_used_without_a_compiler(monkeypatch, tmp_path):
    """A node whose cache holds a kernel for this CPU, but that has no compiler (or a cache copied beside the
    code), still draws Philox z, the same ones."""
    _fresh_kernel(monkeypatch, tmp_path, os.environ.get("CC", "cc"))
    expected = philox.normal_(torch.empty(1000), 5, 123)
    assert len(list(tmp_path.glob("philox-*.so"))) == 1
    _fresh_kernel(monkeypatch, tmp_path, "no-such-compiler")
    assert torch.equal(philox.normal_(torch.empty(1000), 5, 123), expected)
    _fresh_kernel(monkeypatch, tmp_path / "empty", "no-such-compiler")
    with pytest.raises(philox.KernelUnavailable, match="no C compiler.*no kernel built for this CPU"):
        philox.kernel()


@requires_data
def test_a_cpu_run_without_a_compiler_falls_back_to_torch_and_records_it(monkeypatch, tmp_path, make_cfg, caplog):
    from dpft.train import run

    compiler = os.environ.get("CC", "cc")
    _fresh_kernel(monkeypatch, tmp_path / "cache", "no-such-compiler")
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=mezo")
    with caplog.at_level(logging.WARNING, logger="dpft"):
        results = run(cfg)
    assert results["status"] == "completed"
    assert results["fallbacks"]["method.z_generator"]["used"] == "torch"
    assert "no C compiler" in results["fallbacks"]["method.z_generator"]["reason"]
    assert results["config"]["method"]["z_generator"] == "torch"  # a report keeps it apart from Philox runs
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING] == [
        "method.z_generator=philox needs a C compiler"]
    _fresh_kernel(monkeypatch, tmp_path / "cache", compiler)
    again = run(make_cfg("model=opt-tiny", "task=sst2", "method=mezo"))
    assert "fallbacks" not in again and again["config"]["method"]["z_generator"] == "philox"


def test_the_kernel_refuses_tensors_it_cannot_write():
    for bad in (torch.empty(8, dtype=torch.float64), torch.empty(4, 4).t()):
        with pytest.raises(ValueError, match="contiguous float32 CPU"):
            philox.normal_(bad, 0)
