"""`dpft-bench --only precision`: what the dtype of the trained weights does to a zeroth-order step.

Measured with the suite's own `ZerothOrderSGD` (its perturb, restore and update passes) on one weight tensor of
1M entries drawn from N(0, 0.03²), φ = 1e-3, z drawn anew each step, in each storage dtype a configuration can give
the trained weights:

- zo_restore_drift_200_steps   ‖θ₂₀₀ − θ₀‖ / ‖θ₀‖ after 200 steps at lr = 0: the perturb (+φz), the swap (−2φz) and
                               the restore (+φz) should cancel exactly; what remains is rounding.
- zo_update_relative_error     ‖Δθ − u‖ / ‖u‖ for one step whose update u = −η·g·z has size 1e-5 per coordinate
                               (DPZero's and MeZO's lr × projected gradient on OPT).

One record per scheme; `"default": true` marks the dtype that `model=opt-1.3b trainer=gpu method=mezo` composes to
(`dpft.models.precision.trained_dtype`), which carries the targets (drift ≤ 1e-3, update error ≤ 0.1).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR
from dpft.methods.zeroth_order import ZerothOrderSGD
from dpft.models.precision import trained_dtype

SCHEMES = {torch.float32: "float32 trained weights", torch.float16: "float16 weights (MeZO's --load_float16)",
           torch.bfloat16: "bfloat16 weights (bf16-true)"}
TARGETS = {"zo_restore_drift_200_steps": 1e-3, "zo_update_relative_error": 0.1}
ENTRIES, STD, EPS, UPDATE = 1_000_000, 0.03, 1e-3, 1e-5


def default_dtype() -> torch.dtype:
    """The trained weights' dtype under `model=opt-1.3b trainer=gpu` (the GPU configurations of the OPT tables)."""
    model = OmegaConf.load(CONFIG_DIR / "model" / "opt-1.3b.yaml")
    return trained_dtype(model, OmegaConf.load(CONFIG_DIR / "trainer" / "gpu.yaml").precision)


def _weights(dtype: torch.dtype, entries: int, device: str) -> torch.nn.Parameter:
    values = torch.randn(entries, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * STD
    return torch.nn.Parameter(values.to(device=device, dtype=dtype))


def restore_drift(dtype: torch.dtype, steps: int = 200, entries: int = ENTRIES, device: str = "cpu") -> float:
    p = _weights(dtype, entries, device)
    start = p.detach().double().clone()
    opt = ZerothOrderSGD([p], lr=0.0, eps=EPS, seed=0)
    for _ in range(steps):
        opt.step(lambda: torch.ones(1))
    return float((p.detach().double() - start).norm() / start.norm())


def update_error(dtype: torch.dtype, entries: int = ENTRIES, device: str = "cpu") -> float:
    """One whole step (perturb, swap, restore and update) whose projected gradient is g = 1 (a closure returning
    ℓ⁺ − ℓ⁻ = 2φ) at lr = 1e-5: the error counts the step's own perturbation rounding too."""
    p = _weights(dtype, entries, device)
    start = p.detach().double().clone()
    opt = ZerothOrderSGD([p], lr=UPDATE, eps=EPS, seed=0)
    calls = iter(range(2))
    opt.step(lambda: torch.tensor([2 * EPS if next(calls) == 0 else 0.0]))
    g = float(opt.state["zo"]["projected_grads"][0])  # 1, to float32's rounding of 2φ / 2φ
    # the intended update, from the same z drawn in float32 (a float32 twin of the weights, same seed and name)
    twin = ZerothOrderSGD([torch.nn.Parameter(torch.zeros(entries, device=device))], lr=UPDATE, eps=EPS, seed=0)
    u = -UPDATE * g * twin._z(twin.param_groups[0]["params"][0], 0, twin.step_seed(0)).double()
    return float(((p.detach().double() - start) - u).norm() / u.norm())


def bench_precision(device: str = "cpu", entries: int = ENTRIES) -> list[dict[str, Any]]:
    default = default_dtype()
    records = []
    for dtype, scheme in SCHEMES.items():
        values = {"zo_restore_drift_200_steps": restore_drift(dtype, entries=entries, device=device),
                  "zo_update_relative_error": update_error(dtype, entries=entries, device=device)}
        for name, value in values.items():
            records.append({"name": name, "method": "mezo", "model_shape": f"{entries} entries ~ N(0, {STD}²)",
                            "params": entries, "batch_size": None, "seq_len": None, "device": device,
                            "ratio": value, "target": TARGETS[name] if dtype == default else None,
                            "dtype": str(dtype).removeprefix("torch."), "scheme": scheme, "default": dtype == default,
                            "eps": EPS, "update": UPDATE})
    return records


# --- one step in fp32 against the same step in another scheme (tests/test_precision.py, tests/test_gpu.py) ------
def projected_gradient(model: torch.nn.Module, loss: Any, directions: list[torch.Tensor], eps: float = EPS,
                       autocast: str | None = None) -> float:
    """(ℓ(θ + φz) − ℓ(θ − φz)) / 2φ for given directions z (one per parameter, drawn once by the caller so two
    devices use the same z), `loss(model)` the mean loss, under bf16 autocast on the device `autocast` names."""
    params = list(model.parameters())

    def at(scale: float) -> float:
        for p, z in zip(params, directions):
            p.add_(z.to(device=p.device, dtype=p.dtype), alpha=scale)
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            return float(loss(model))

    with torch.no_grad():
        plus, minus = at(eps), at(-2 * eps)
        at(eps)
    return (plus - minus) / (2 * eps)


def clipped_gradient(model: torch.nn.Module, losses: Any, examples: int, clip: float,
                     autocast: str | None = None) -> list[torch.Tensor]:
    """Σ_i min(1, C/‖g_i‖) g_i over the `examples` per-example losses `losses(model)`, as DP-SGD forms it before
    the noise; returned on the CPU in float32 (for comparison across devices)."""
    from dpft.privacy.per_example import PerExampleGradients

    params = [p for p in model.parameters() if p.requires_grad]
    per_example = PerExampleGradients(model, params)
    try:
        with per_example.capture(examples), torch.autocast(autocast or "cpu", dtype=torch.bfloat16,
                                                            enabled=autocast is not None):
            values = losses(model)
        per_example.backward(values.sum())
        norms = torch.stack(list(per_example.norms_by_layer().values())).sum(0).sqrt()
        per_example.accumulate((clip / (norms + 1e-6)).clamp(max=1.0))
        out = [p.summed_grad.detach().float().cpu() for p in params]
    finally:
        per_example.remove()
        for p in params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
    return out
