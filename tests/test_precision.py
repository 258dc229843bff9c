"""Every method runs under the trainer precisions its GPU configurations compose to, tested on CPU."""

from __future__ import annotations

import math

import pytest

from dpft.train import run
from tests.conftest import requires_data

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


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_the_gpu_configs_precision(make_cfg, method):
    """`trainer=gpu` (and `trainer=ddp`) compose to bf16-true."""
    results = run(make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), "trainer.precision=bf16-true"))
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])


@pytest.mark.parametrize("precision", ["16-true", "64-true", "bf16-mixed"])
@pytest.mark.parametrize("method", ["mezo", "dpzo", "dpsgd", "dr_encoder"])
def test_other_precisions_a_user_can_set_run_or_are_refused(make_cfg, method, precision):
    from dpft.validation import ConfigError

    cfg = make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), f"trainer.precision={precision}")
    refused = {("mezo", "bf16-mixed"): "cannot run a zeroth-order step", ("dpzo", "bf16-mixed"): "cannot run a "
               "zeroth-order step", ("dpsgd", "16-true"): "without loss scaling"}
    if (method, precision) in refused:
        with pytest.raises(ConfigError, match=refused[method, precision]):
            run(cfg)
        return
    results = run(cfg)
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])


def test_the_dr_encoder_codec_stays_float32_when_the_model_is_cast():
    import torch

    from dpft.methods.federated import GradientAutoEncoder

    codec = GradientAutoEncoder([torch.Size([4, 3])], compression=2, chunk=4, hidden=3)
    before = [p.clone() for p in codec.parameters()]
    holder = torch.nn.Sequential(torch.nn.Linear(2, 2), codec).to(torch.bfloat16)  # what bf16-true does
    assert holder[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(codec.parameters(), before))
