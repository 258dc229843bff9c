"""The classifier's feature cache: a frozen encoder's features are computed once per text and reused."""

from __future__ import annotations

import pytest
import torch

from dpft.models.loading import load_model
from dpft.models.peft import select_trainable
from dpft.train import run
from tests.conftest import compose_config


def _minilm(cache: bool) -> torch.nn.Module:
    cfg = compose_config(["model=minilm-l6", f"model.cache_features={str(cache).lower()}"])
    return load_model(cfg.model, num_labels=2)


def _batch(texts=((101, 2023, 2003, 2307, 102), (101, 2919, 102))):
    """Token ids of two texts, right-padded into one batch."""
    rows = [list(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_frozen_encoder_features_are_cached_and_equal_uncached_ones():
    model = select_trainable(_minilm(cache=True), "head")
    model.train()
    assert not model.encoder.training and model.head.training  # a frozen encoder runs without dropout
    ids, mask = _batch()
    first = model.pool(ids, mask)
    assert len(model._features) == 2
    # each row alone, unpadded: the cached value does not depend on the batch it first came in
    for row, (r_ids, r_mask) in enumerate(zip(ids, mask)):
        alone = model._pool(r_ids[r_mask.bool()][None], torch.ones(1, int(r_mask.sum()), dtype=torch.long))[0]
        assert torch.equal(first[row], alone)
    torch.testing.assert_close(first, model._pool(ids, mask), rtol=1e-5, atol=1e-5)
    # reordered and repadded, the same texts give the same features bit for bit, from the cache
    wide_ids = torch.cat([ids.flip(0), torch.zeros(2, 3, dtype=torch.long)], 1)
    wide_mask = torch.cat([mask.flip(0), torch.zeros(2, 3, dtype=torch.long)], 1)
    with torch.inference_mode():
        again = model.pool(wide_ids, wide_mask)
    assert torch.equal(again, first.flip(0)) and not again.is_inference()
    assert len(model._features) == 2


def test_cache_is_emptied_when_an_encoder_weight_changes():
    model = select_trainable(_minilm(cache=True), "head").eval()
    ids, mask = _batch()
    before = model.pool(ids, mask)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(0.5)
    after = model.pool(ids, mask)
    torch.testing.assert_close(after, model._pool(ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_no_cache_when_the_encoder_trains_or_it_is_off():
    training = _minilm(cache=True).train()  # trainable=all: dropout on, features change every step
    ids, mask = _batch()
    training.pool(ids, mask)
    assert training.encoder.training and not training._features
    off = select_trainable(_minilm(cache=False), "head").eval()
    off.pool(ids, mask)
    assert not off._features


def test_head_only_zo_run_with_and_without_the_cache_agree(tmp_path):
    """The same MeZO head run on real MiniLM, features cached or recomputed: the same test loss and accuracy,
    up to the float rounding of batched versus single-text encoder passes."""
    args = ["model=minilm-l6", "task=sst2-k16", "method=mezo", "method.trainable=head", "method.lr=1e-2",
            "trainer.max_steps=4", "method.batch_size=8"]
    cached, plain = (run(compose_config([*args, f"model.cache_features={cache}"], tmp_path / cache))
                     for cache in ("true", "false"))
    assert cached["status"] == plain["status"] == "completed"
    assert abs(cached["metrics"]["test/loss"] - plain["metrics"]["test/loss"]) < 1e-4
    assert cached["metrics"]["test/acc"] == plain["metrics"]["test/acc"]


def test_a_model_missing_offline_names_hf_hub_offline_not_an_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["model=opt-tiny", "model.pretrained=no-such-org/no-such-model"], tmp_path)
    with pytest.raises(OSError, match=r"no-such-org/no-such-model.*not a local folder, and HF_HUB_OFFLINE=1 keeps"):
        load_model(cfg.model)
