"""Per-example gradient norms and clipped sums in one backward pass ("book-keeping").

The unit of privacy is the example. A batch may hold several forward rows per example (a causal LM scores
a classification task whose label words are not all one token with one row per candidate); `capture(B,
owner)` takes the row → example map (`batch["owner"]`; none: row i is example i), and every rule below
sees one example's rows as one sequence, so norms, clip factors, sums and the non-finite drop mask are
per example whatever the rows.

Forward hooks record each supported layer's input a, and one backward of Σ_i ℓ_i (`backward(loss)`) its
output gradient g. Each layer's a and g are first put per row, [rows, T, d] (an input flattened to
[rows·T, d], as OPT's MLP reads it, is cut by the number of rows), then per example, [B, K·T, d]: the
rows an example owns laid end to end (zeros where it owns fewer than K). From them, per example i and layer:

- norms: Linear ‖Σ_t g_itᵀ a_it‖², either materialised (B·d_out·d_in) or by the ghost-norm identity
  Σ_{t,s} (a_it·a_is)(g_it·g_is) (B·(KT)²), whichever is smaller (layers that read one input, attention's
  q, k and v, share its Gram a·aᵀ); t and s run over the tokens of all of i's rows. LayerNorm and
  Embedding likewise;
- the clipped sum Σ_i c_i ∇ℓ_i is then one weighted contraction per layer (c_i folded into g), with
  no per-example gradient ever stored for the whole model and no second backward.

A layer whose input is not one per row (BERT's position embedding reads one [1, T] row of ids for the
whole batch: its output gradient is already summed over the examples) has no per-example gradient; it
is refused by name at its first forward pass (`dpft.validation` runs one on a weightless copy of the
model before any data loads).

`backward(loss)` differentiates to the hooked layers' outputs only (`torch.autograd.grad`): that gives
every g the rules read, and autograd skips the weight gradients the clipped sum replaces (a full
fine-tuning backward costs its input gradients alone; `p.grad` stays None until the noise is added).
Not `loss.backward(inputs=outputs)` with tensor hooks: that also copies each g into the output's `.grad`,
which at OPT-125m, 32 × 256 made the backward twice as slow (22.5–22.7 s against 11.0–11.8 s, dpft-bench's batch).

Why not Opacus: its per-sample gradients follow the batch dimension of each layer's input, which is not
the example here: on OPT it returns one gradient per token for fc1, fc2 and the blocks' final LayerNorm
(OPT flattens the tokens before them), one per row elsewhere, and one for the whole batch for BERT's
position embedding, so its own clipping fails ("stack expects each tensor to be equal size") or bounds
rows, not examples; its ghost clipping also needs a second backward pass. Why not `torch.func.vmap(grad)`:
it materialises B × |θ| gradients and HF models are not all vmap-safe. This implementation needs only
per-layer rules, and is checked in the tests against the definition (each example's gradient alone, its
rows forwarded together) and against Opacus's per-sample gradients summed by hand per example.

Supported layers: nn.Linear (incl. peft's LoRA factors), nn.LayerNorm, RMSNorm (nn.RMSNorm and the models' own
`*RMSNorm` classes: Llama, Qwen2, Mistral scale x/rms(x) by w, Gemma by 1 + w, so both have the per-example
gradient Σ_t g_t ⊙ x_t/rms(x_t)), nn.Embedding. A trainable parameter anywhere else, or one shared by two layers
(tied embeddings), is refused with its name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Embedding)
SUPPORTED_NAMES = "Linear, LayerNorm, RMSNorm, Embedding"


def rms_epsilon(module: nn.Module) -> float | None:
    """The ε of an RMSNorm layer (torch's, or a model's own `*RMSNorm` with a weight and no bias); None if it is
    not one."""
    if isinstance(module, nn.RMSNorm):
        return module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    if not type(module).__name__.endswith("RMSNorm") or getattr(module, "bias", None) is not None:
        return None
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps") if hasattr(module, a)), None)
    return float(eps) if isinstance(eps, int | float) else None


def supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED) or rms_epsilon(module) is not None
SUPPORTED_MODES = "full (all non-embedding weights), lora (method.peft.mode=lora), head (method.trainable=head)"


class UnsupportedLayerError(ValueError):
    pass


class PerExampleGradients:
    """Hooks on the layers that own trainable parameters. Use `capture()` around the forward pass."""

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]):
        trainable = {id(p) for p in params}
        self.trainable = trainable  # the parameters counted and summed (not whatever has requires_grad set)
        self.layers: list[tuple[str, nn.Module]] = []
        owner: dict[int, str] = {}
        elsewhere: dict[int, str] = {}  # trainable parameters seen on unsupported modules
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in trainable]
            if not own:
                continue
            if not supported(module):
                elsewhere.update({id(p): f"{name!r} ({type(module).__name__})" for p in own})
                continue
            for p in own:
                if id(p) in owner:
                    raise UnsupportedLayerError(
                        f"per-example gradients: a parameter is shared by {owner[id(p)]!r} and {name!r} (tied "
                        f"weights); freeze it (method.trainable=no_embeddings freezes embeddings) or untie it")
                owner[id(p)] = name
            self.layers.append((name, module))
        # a parameter of an unsupported module is fine when a supported layer uses it too (RoBERTa's tied
        # lm_head.bias is the bias of lm_head.decoder)
        orphans = sorted({where for pid, where in elsewhere.items() if pid not in owner})
        if orphans:
            raise UnsupportedLayerError(
                f"per-example gradients: layer {orphans[0]} has trainable parameters but is not supported "
                f"(supported: {SUPPORTED_NAMES}). Freeze it or use a supported mode: "
                f"{SUPPORTED_MODES}")
        if trainable - set(owner):
            raise UnsupportedLayerError(f"{len(trainable - set(owner))} trainable parameters belong to no layer")
        self._names = {module: name for name, module in self.layers}
        self._capturing = False
        self.batch_size = self.rows = 0
        self._slots: tuple[torch.Tensor, int] | None = None  # (place of each row, K); None: row i is example i
        self._dropped: torch.Tensor | None = None
        self._acts: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # --- capture --------------------------------------------------------------------------------
    def capture(self, examples: int, owner: torch.Tensor | None = None) -> PerExampleGradients:
        """The next forward pass holds `examples` examples; forward row r belongs to example `owner[r]`
        (`batch["owner"]`; None: one row per example)."""
        self.batch_size = examples
        self.rows = examples if owner is None else len(owner)
        self._slots = None if owner is None else self._slot_map(owner, examples)
        self.release()
        return self

    @staticmethod
    def _slot_map(owner: torch.Tensor, examples: int) -> tuple[torch.Tensor, int] | None:
        """(each row's place owner·K + its rank among its example's rows, K = most rows of one example); None
        for one row per example in order, which needs no regrouping."""
        owner = owner.long()
        if owner.dim() != 1 or (len(owner) and (int(owner.min()) < 0 or int(owner.max()) >= examples)):
            raise ValueError(f"owner must map each forward row to an example in [0, {examples}), "
                             f"got shape {tuple(owner.shape)}")
        if len(owner) == examples and bool((owner == torch.arange(examples, device=owner.device)).all()):
            return None
        counts = torch.bincount(owner, minlength=examples)
        order = torch.argsort(owner, stable=True)
        first = torch.cumsum(counts, 0) - counts  # rank of each example's first row in `order`
        slot = torch.empty_like(owner)
        slot[order] = torch.arange(len(owner), device=owner.device) - first[owner[order]]
        k = int(counts.max())
        return owner * k + slot, k

    def release(self) -> None:
        """Drop what the last capture holds (activations, output gradients), once the step has used it."""
        self._acts.clear()
        self._grads.clear()
        self._outputs.clear()
        self._dropped = None

    def drop(self, examples: torch.Tensor) -> None:
        """Exclude examples (bool [B]) from norms and sums, e.g. those whose loss or gradient is not finite:
        all the rows each one owns."""
        if examples.shape != (self.batch_size,):
            raise ValueError(f"drop takes one flag per example ({self.batch_size}), got shape {tuple(examples.shape)}")
        self._dropped = examples if examples.any() else None

    def __enter__(self) -> PerExampleGradients:
        self._capturing = True
        return self

    def __exit__(self, *exc) -> None:
        self._capturing = False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._capturing or not torch.is_grad_enabled():
            return
        if module in self._acts:
            raise UnsupportedLayerError(f"layer {type(module).__name__} is called twice in one forward pass; "
                                        "per-example gradients need one call per layer")
        a = inputs[0]
        # one input per forward row, or tokens flattened into the rows ([rows·T, d], OPT's MLP)
        flat = a.dim() == 2 and not isinstance(module, nn.Embedding) and self.rows > 0
        if a.dim() == 0 or not (a.shape[0] == self.rows or (flat and a.shape[0] % self.rows == 0)):
            embedding = isinstance(module, nn.Embedding)
            raise UnsupportedLayerError(
                f"per-example gradients: layer {self._names[module]!r} ({type(module).__name__}) reads an input of "
                f"shape {tuple(a.shape)}, not one per forward row ({self.rows} rows), so its gradient cannot be split "
                f"by example{' (one row of position ids for the whole batch, as in BERT)' if embedding else ''}; "
                f"freeze it{' (method.trainable=no_embeddings)' if embedding else ''} or use a supported mode: "
                f"{SUPPORTED_MODES}")
        self._acts[module] = a.detach()
        self._outputs[module] = output

    def backward(self, loss: torch.Tensor) -> None:
        """Output gradients g of the captured forward for `loss` (Σ_i ℓ_i); no `p.grad` is touched."""
        if not self._outputs:
            raise RuntimeError("nothing captured: run the forward pass under `with per_example.capture(B):`")
        modules = list(self._outputs)
        grads = torch.autograd.grad(loss, [self._outputs[m] for m in modules], allow_unused=True)
        self._outputs.clear()  # the graph is freed; only g is needed now
        self._grads = {m: g for m, g in zip(modules, grads) if g is not None}

    # --- per-layer rules --------------------------------------------------------------------------
    def _by_example(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, T, ...] -> [B, K·T, ...]: each example's rows end to end, zeros after its last one."""
        if self._slots is None:
            return x
        place, k = self._slots
        out = x.new_zeros((self.batch_size * k, *x.shape[1:]))
        out.index_copy_(0, place.to(x.device), x)  # not out[owner, slot] = x: 300× slower on CPU
        return out.view(self.batch_size, -1, *x.shape[2:])

    def _pairs(self):
        """(name, module, a, g) per layer, per example: a [B, T', d] (ids [B, T'] for an Embedding), g [B, T', d_out]."""
        for name, module in self.layers:
            if module not in self._grads:  # the layer did not influence the loss: zero gradients
                continue
            a, g = self._acts[module], self._grads[module]
            # per row: (rows, d) inputs (a classification head) or tokens flattened to (rows·T, d) (OPT's MLP)
            a = a.reshape(self.rows, -1) if isinstance(module, nn.Embedding) else a.reshape(self.rows, -1, a.shape[-1])
            a, g = self._by_example(a), self._by_example(g.reshape(self.rows, -1, g.shape[-1]))
            if self._dropped is not None:  # examples with non-finite values contribute nothing
                keep = (~self._dropped).view(-1, *([1] * (g.dim() - 1)))
                g = torch.where(keep, g.float(), 0.0)
                if a.is_floating_point():
                    a = torch.where(keep, a, 0.0)
            yield name, module, a, g.float()

    @staticmethod
    def _normalized(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """A LayerNorm's or RMSNorm's input before its scale (and shift): what its weight multiplies."""
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(a.float(), module.normalized_shape, None, None, module.eps)
        a = a.float()
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + rms_epsilon(module))

    @staticmethod
    def _ghost(t: int, d_in: int, d_out: int) -> bool:
        """Ghost norm (two T × T Grams) where it is smaller than the materialised d_out × d_in gradient."""
        return t * t < d_in * d_out

    def _trains(self, p: nn.Parameter | None) -> bool:
        return p is not None and id(p) in self.trainable

    def norms_by_layer(self) -> dict[str, torch.Tensor]:
        """Squared per-example gradient norm of each layer's trainable parameters, {name: [B]}."""
        out = {}
        last_gram: tuple[tuple, torch.Tensor] | None = None  # q, k and v read one input: its Gram once
        for name, module, a, g in self._pairs():
            total = g.new_zeros(g.shape[0])
            if isinstance(module, nn.Linear):
                if self._trains(module.weight):
                    a32 = a.float()
                    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
                    if self._ghost(t, d_in, d_out):
                        source = self._acts[module]  # held all along, so its address names its values
                        key = (source.data_ptr(), source.dtype, tuple(source.shape), source.stride())
                        if last_gram is None or last_gram[0] != key:
                            last_gram = key, a32 @ a32.transpose(1, 2)
                        total += torch.einsum("bts,bts->b", last_gram[1], g @ g.transpose(1, 2))
                    else:
                        total += torch.einsum("bto,bti->boi", g, a32).pow(2).sum((1, 2))
                if self._trains(module.bias):
                    total += g.sum(1).pow(2).sum(1)
            elif not isinstance(module, nn.Embedding):  # LayerNorm, RMSNorm
                if self._trains(module.weight):
                    total += (g * self._normalized(module, a)).sum(1).pow(2).sum(1)
                if self._trains(getattr(module, "bias", None)):
                    total += g.sum(1).pow(2).sum(1)
            else:  # Embedding: rows of the same token add up
                g = self._embedding_grad(module, a, g)
                same = (a.unsqueeze(2) == a.unsqueeze(1)).float()
                total += torch.einsum("bts,bts->b", same, g @ g.transpose(1, 2))
            out[name] = total
        return out

    @staticmethod
    def _embedding_grad(module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if module.padding_idx is not None:  # F.embedding gives the padding row no gradient
            g = g * (ids != module.padding_idx).unsqueeze(-1)
        return g

    def accumulate(self, factors: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """p.summed_grad = Σ_i c_i ∇_p ℓ_i, with c per example ([B]) or per layer ({name: [B]})."""
        summed: set[int] = set()
        for name, module, a, g in self._pairs():
            c = factors[name] if isinstance(factors, dict) else factors
            gc = g * c.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
            grads: dict[str, torch.Tensor] = {}
            if isinstance(module, nn.Linear):
                grads["weight"] = torch.einsum("bto,bti->oi", gc, a.float())
                grads["bias"] = gc.sum((0, 1))
            elif not isinstance(module, nn.Embedding):  # LayerNorm, RMSNorm
                grads["weight"] = (gc * self._normalized(module, a)).sum((0, 1))
                grads["bias"] = gc.sum((0, 1))
            else:
                gc = self._embedding_grad(module, a, gc)
                weight = torch.zeros(module.weight.shape, dtype=gc.dtype, device=gc.device)
                grads["weight"] = weight.index_add_(0, a.flatten(), gc.reshape(-1, gc.shape[-1]))
            for pname, p in module.named_parameters(recurse=False):
                if self._trains(p) and pname in grads:
                    p.summed_grad = grads[pname].to(p.dtype).contiguous()  # noise is added in place, flat
                    summed.add(id(p))
        for _, module in self.layers:  # layers that did not influence the loss: zero gradients
            for p in module.parameters(recurse=False):
                if self._trains(p) and id(p) not in summed:
                    p.summed_grad = torch.zeros_like(p, memory_format=torch.contiguous_format)

