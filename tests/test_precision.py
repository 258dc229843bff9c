"""Every method runs under the trainer precisions its GPU configurations compose to, tested on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR
from dpft.models.loading import load_model
from dpft.models.peft import apply_peft
from dpft.models.precision import cast_trainable
from dpft.train import run
from tests.conftest import compose_config, requires_data

pytestmark = requires_data

PRIVACY = {"dpzo": "eps2", "dpzo_laplace": "pure_eps4", "dpzero": "eps2", "dpzoso": "eps2", "dpzopo": "eps2",
           "dpsgd": "eps2", "dpsgd_lora": "eps2", "anadp": "eps2", "dp_fedavg": "eps2", "dr_encoder": "eps2"}
METHODS = ["zero_shot", "ft", "ft_lora", "mezo", "mezo_lora", "mezo_prefix", *PRIVACY, "fedavg"]
FED = ["fed.clients=8", "method.batch_size=2", "fed.local_steps=1", "method.encoder.steps=2"]


def _overrides(method: str) -> list[str]:
    out = [f"method={method}", f"privacy={PRIVACY.get(method, 'none')}", "trainer.max_steps=2", "validate=false",
           "trainer.limit_test_batches=1"]
    if method in ("fedavg", "dp_fedavg", "dr_encoder"):
        out += FED[:3] + (FED[3:] if method == "dr_encoder" else [])
    if method == "dpzopo":
        out.append("method.mask_queries=2")
    return out


GPU = OmegaConf.load(Path(CONFIG_DIR) / "trainer" / "gpu.yaml")  # what trainer=gpu (and trainer=ddp) compose to
OPT = OmegaConf.load(Path(CONFIG_DIR) / "model" / "opt-1.3b.yaml")  # the dtypes of every OPT size from 1.3b up


def _gpu_scheme() -> list[str]:
    return [f"trainer.precision={GPU.precision}", f"model.dtype={OPT.dtype}", f"model.trainable_dtype={OPT.trainable_dtype}"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_the_gpu_configs_precision(make_cfg, method):
    results = run(make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), *_gpu_scheme()))
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])


def test_the_gpu_scheme_trains_float32_weights_beside_bfloat16_frozen_ones_under_autocast():
    from dpft.models.precision import AUTOCAST, trained_dtype, unified_precision

    assert AUTOCAST.get(unified_precision(GPU.precision)) == torch.bfloat16  # bf16 compute...
    assert trained_dtype(OPT, GPU.precision) == torch.float32  # ...on float32 trained weights
    model = load_model(compose_config(["model=opt-tiny", "model.dtype=bfloat16"]).model)
    model = apply_peft(model, OmegaConf.create({"mode": "lora", "r": 2, "alpha": 4}))
    cast_trainable(model, OPT)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


@pytest.mark.parametrize("precision", ["16-true", "64-true", "bf16-mixed"])
@pytest.mark.parametrize("method", ["mezo", "dpzo", "dpsgd", "dr_encoder"])
def test_other_precisions_a_user_can_set_run_or_are_refused(make_cfg, method, precision):
    from dpft.validation import ConfigError

    cfg = make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), f"trainer.precision={precision}")
    refused = {("mezo", "16-true"): "stores the trained weights in float16", ("dpzo", "16-true"): "stores the trained "
               "weights in float16", ("dr_encoder", "16-true"): "stores the trained weights in float16",
               ("dpsgd", "16-true"): "without loss scaling"}
    if (method, precision) in refused:
        with pytest.raises(ConfigError, match=refused[method, precision]):
            run(cfg)
        return
    results = run(cfg)
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])


def test_mezos_float16_protocol_runs_when_asked_for_by_name(make_cfg):
    half = ["model.dtype=float16", "model.trainable_dtype=float16", "trainer.precision=16-true"]
    results = run(make_cfg("model=opt-tiny", "task=sst2", *_overrides("mezo"), *half))
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])


def test_scored_logits_are_float32_from_bfloat16_weights_under_autocast():
    """bf16 rounds a logit to 2⁻⁸ of its size; the scored rows of the output layer are computed in float32."""
    from dpft.models.scoring import logits_at

    model = load_model(compose_config(["model=opt-tiny", "model.dtype=bfloat16"]).model)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(40)  # logits of size ~10, where bf16's spacing is 0.0625
    seen = []
    hook = head.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
    ids = torch.randint(3, 1000, (3, 9))
    positions = torch.tensor([[8], [4], [0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_at(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, positions)
    hook.remove()
    hidden, rounded = seen[0]
    exact = hidden.double() @ head.weight.double().T  # from the head's own input, in float64
    assert logits.dtype == torch.float32 and logits.shape == exact.shape
    assert (logits.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (rounded.double() - exact).abs().max() > 1e-2  # what the head alone returns under autocast


def test_the_dr_encoder_codec_stays_float32_when_the_model_is_cast():
    import torch

    from dpft.methods.federated import GradientAutoEncoder

    codec = GradientAutoEncoder([torch.Size([4, 3])], compression=2, chunk=4, hidden=3)
    before = [p.clone() for p in codec.parameters()]
    holder = torch.nn.Sequential(torch.nn.Linear(2, 2), codec).to(torch.bfloat16)  # what bf16-true does
    assert holder[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(codec.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zo_steps_keep_the_weights_and_the_update_only_in_the_default_scheme(dtype):
    """The targets of `dpft-bench --only precision` on 200k entries: the GPU configurations' dtype of the trained
    weights meets them, float16 (MeZO) and bfloat16 do not."""
    from dpft.bench.precision import default_dtype, restore_drift, update_error

    assert default_dtype() == torch.float32
    drift, error = restore_drift(dtype, entries=200_000), update_error(dtype, entries=200_000)
    sound = drift <= 1e-3 and error <= 0.1
    assert sound == (dtype == default_dtype()), (drift, error)


ZO_TOLERANCE, DP_TOLERANCE = 0.05, 0.15  # relative; also what tests/test_gpu.py allows between CPU and CUDA


def _twins(shape: str = "opt-tiny", lora: bool = False):
    """The same random model in float32, and in the GPU configurations' scheme (bf16 frozen, fp32 trained)."""
    out = []
    for dtype in ("float32", "bfloat16"):
        model = load_model(compose_config([f"model={shape}", f"model.dtype={dtype}"]).model).eval()
        if lora:
            model = apply_peft(model, OmegaConf.create({"mode": "lora", "r": 4, "alpha": 8}))
            with torch.no_grad():  # LoRA's B starts at zero: give both twins the same non-zero adapters
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        out.append(cast_trainable(model, OPT))
    return out


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt() / sum(x.pow(2).sum() for x in a).sqrt())


def test_one_zo_and_one_dp_step_of_the_gpu_scheme_agree_with_float32():
    """The scheme's bf16 compute moves a ZO projected gradient and a clipped DP-SGD sum by less than the tolerances
    (bf16 autocast on the CPU; tests/test_gpu.py checks CUDA against this CPU float32 reference)."""
    from dpft.bench.precision import clipped_gradient, projected_gradient
    from dpft.bench.run import make_batch, per_example_loss

    fp32, scheme = _twins()
    batch = make_batch(fp32, 8, 32, "cpu")
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(p.shape, generator=gen) for p in fp32.parameters()]
    mean_loss = lambda m: per_example_loss(m, batch).float().mean()  # noqa: E731
    g32 = projected_gradient(fp32, mean_loss, directions)
    assert abs(projected_gradient(scheme, mean_loss, directions, autocast="cpu") - g32) <= ZO_TOLERANCE * abs(g32)
    fp32, scheme = _twins(lora=True)
    losses = lambda m: per_example_loss(m, batch).float()  # noqa: E731
    reference = clipped_gradient(fp32, losses, 8, clip=0.01)  # a clip that clips
    assert _relative(reference, clipped_gradient(scheme, losses, 8, clip=0.01, autocast="cpu")) <= DP_TOLERANCE
    assert _relative(reference, clipped_gradient(fp32, losses, 8, clip=0.02)) > DP_TOLERANCE  # the test can fail
