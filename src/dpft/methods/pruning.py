"""DP-ZOPO's data-free coordinate selection, computed from the model alone (no data: no privacy cost).

Following the DPZOPO code (Liu et al. 2024, `src/prune.py`): SynFlow-style linearisation (every
weight replaced by |w|, a constant one-token input, objective R = sum of the outputs), two
zeroth-order gradient estimates g₁ at θ and g₂ at θ + λg₁, the Hessian-gradient product
Hg ≈ (g₂ - g₁)/λ, score = Hg ⊙ θ; a global quantile (default 1%) of |score| is trainable.

Our choices, stated: `select="largest"` (default) keeps the highest-scoring coordinates, SynFlow's
notion of importance. A static reading of the DPZOPO code keeps the *smallest* instead
(`select="smallest"` reproduces it); on OPT that picks coordinates the objective does not depend on
at second order (attention key biases, which softmax ignores, and the final LayerNorm bias), so a
step on them cannot change the loss. Embedding matrices are never selected (with a constant input
almost all their rows score exactly 0), and the estimate uses `queries` directions from its own generator.
Memory: two gradient-sized buffers, once, before training.
"""

from __future__ import annotations

import torch
from torch import nn

from dpft.seeding import derive_seed


def _objective(model: nn.Module, device: torch.device) -> float:
    ids = torch.ones((1, 1), dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = out if torch.is_tensor(out) else out.logits
    return float(out.double().sum())


@torch.no_grad()
def _zo_gradient(params: list[nn.Parameter], model: nn.Module, queries: int, phi: float, seed: int,
                 device: torch.device) -> list[torch.Tensor]:
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    gen = torch.Generator(device=device)
    for q in range(queries):
        zs = []
        for i, p in enumerate(params):
            gen.manual_seed(derive_seed(derive_seed(seed, q), i))
            zs.append(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
        for p, z in zip(params, zs):
            p.add_(z, alpha=phi)
        plus = _objective(model, device)
        for p, z in zip(params, zs):
            p.add_(z, alpha=-2 * phi)
        minus = _objective(model, device)
        for p, z, g in zip(params, zs, grads):
            p.add_(z, alpha=phi)
            g.add_(z.float(), alpha=(plus - minus) / (2 * phi) / queries)
    return grads


@torch.no_grad()
def data_free_mask(params: list[nn.Parameter], model: nn.Module, fraction: float, queries: int = 8,
                   phi: float = 1e-3, seed: int = 0, select: str = "largest") -> list[torch.Tensor]:
    """Flat indices of the selected coordinates of each parameter (empty for embeddings)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"method.mask_fraction must be in (0, 1], got {fraction}")
    if select not in ("largest", "smallest"):
        raise ValueError(f"method.mask_select={select!r} is not one of ('largest', 'smallest')")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    device = params[0].device
    was_training = model.training
    model.eval()
    originals = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.abs_()
        g1 = _zo_gradient(params, model, queries, phi, seed, device)
        for p, g in zip(params, g1):
            p.add_(g.to(p.dtype), alpha=phi)
        g2 = _zo_gradient(params, model, queries, phi, seed + 1, device)
    finally:
        for p, original in zip(params, originals):
            p.copy_(original)
        model.train(was_training)
    sign = 1.0 if select == "smallest" else -1.0  # rank so that the chosen ones come first
    scores = [sign * ((b - a) / phi * p.float()).abs() for p, a, b in zip(params, g1, g2)]
    candidates = torch.cat([s.flatten() for s, p in zip(scores, params) if id(p) not in embeddings])
    k = max(1, int(round(fraction * candidates.numel())))
    threshold = torch.kthvalue(candidates.cpu(), k).values.item()
    masks, budget = [], k
    for score, p in zip(scores, params):
        if id(p) in embeddings:
            masks.append(torch.zeros(0, dtype=torch.long, device=p.device))
            continue
        chosen = (score.flatten() <= threshold).nonzero().flatten()[:budget]  # ties cut at k in total
        budget -= chosen.numel()
        masks.append(chosen.to(p.device))
    return masks
