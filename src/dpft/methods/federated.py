"""Federated LoRA fine-tuning simulated in one Lightning run: FedAvg, DP-FedAvg and DR-Encoder.

One training step is one round. The round's clients (a batch from `FederatedDataModule`) each start
from the global trainable weights (the LoRA factors, and a classifier's head), take `fed.local_steps`
SGD steps (lr `method.lr`) on minibatches of their own shard, and report the update Δ_c = θ_c − θ. The
server turns the updates into one pseudo-gradient −Δ̄ for its optimizer (SGD with lr 1: θ += Δ̄).

    fedavg       Δ̄ = mean_c Δ_c over the sampled clients (exactly clients_per_round; no privacy)
    dp_fedavg    Δ̄ = (Σ_c clip_C(Δ_c) + N(0, σ²C²)) / m,   noise drawn once by the server
    dr_encoder   client c uploads code_c = E(clip_C(Δ_c) + N(0, σ²C²/|B|)); Δ̄ = D(Σ_c code_c / m)
                 (`noise_placement=local`, the paper's: code_c = E(clip_C(Δ_c) + N(0, σ²C²)))

with m = clients_per_round (the expected number of sampled clients) and |B| the round's sampled count.

Privacy statement of the private methods (client-level): adjacency is adding or removing one client
(all of its data); clients are Poisson-sampled with q = clients_per_round / N each round; each client's
contribution (its update, or in stage 1 its statistics) is clipped to L2 norm C; the sum of the round's
contributions gets exactly one Gaussian N(0, σ²C²) — in DR-Encoder it is split into equal independent
shares N(0, σ²C²/|B|) that the clients add before encoding (an empty round: the server draws it). The
encoder E is linear, so Σ_c code_c = E(Σ_c clip(Δ_c) + N(0, σ²C²)): the server's view of the aggregate
and every released model are post-processing of one sampled Gaussian mechanism per round, accounted by
`dp-accounting` over prior_rounds + rounds rounds (σ calibrated once). This holds for the aggregate, i.e.
a server that adds the codes up (secure aggregation) or is trusted; one client's code alone carries only
its noise share.

DR-Encoder with `noise_placement=local` (the paper's mode): every client adds the full N(0, σ²C²) to its own
clipped update (and stage-1 statistics), so each upload is private on its own, against a server that sees it and
knows whom it sampled: adjacency is replacing one client's data (its clipped contribution moves by up to 2C),
with no amplification by sampling; a client's uploads over the prior_rounds + rounds rounds compose (at most one
per round), accounted by PLD at q = 1 (`PrivacySpec.local`). The aggregate then carries |B|σ²C² of noise.

DR-Encoder (Wu et al., AAAI-25; no public code, so the choices here are ours and stated in the config):
- stage 1, the random prior (`prior_rounds` rounds, charged to the budget): sampled clients compute an
  update from the initial weights, clip it to C and report per-tensor statistics, scaled so that one
  client's statistics vector has L2 norm ≤ C (`client_statistics`); the server adds N(0, σ²C²) to their
  sum and derives each tensor's mean and variance. It draws synthetic Gaussian updates from them and
  trains the gradient auto-encoder on those only (`GradientAutoEncoder.fit` takes a prior and a seed,
  nothing else). The encoder and decoder are then frozen.
- stage 2: the rounds above. Each tensor is cut into chunks of `encoder.chunk` entries; a linear encoder
  maps a chunk to `chunk // compression` numbers, and an MLP decoder (`encoder.hidden`, 0: linear) maps
  codes back. Uploaded bytes are the codes' bytes (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpft.data.tasks import Example
from dpft.methods.base import MethodModule
from dpft.methods.dp_first_order import make_optimizer
from dpft.privacy.accounting import PrivacySpec
from dpft.privacy.ledger import PrivacyLedger
from dpft.privacy.noise import NoiseSource
from dpft.seeding import derive_seed

AGGREGATIONS = ("mean", "noisy_sum", "encoded")
NOISE_PLACEMENTS = ("split", "local")  # DR-Encoder: shares of one central draw | each client the full σC
# seed streams of one run
_LOCAL, _NOISE, _PRIOR_SAMPLING, _AUTOENCODER = 0xC11E, 0x4015E, 0x9210, 0xAE


def flat_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def clip_update(update: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """update · min(1, C / ‖update‖), the norm over all tensors together."""
    factor = min(1.0, clip / (float(flat_norm(update)) + 1e-12))
    return [u * factor for u in update]


def client_statistics(update: list[torch.Tensor], clip: float) -> torch.Tensor:
    """One client's stage-1 report for a clipped update (‖Δ‖ ≤ C): per tensor l with d_l entries,
    a_l = Σ_j Δ_lj / √(2 d_l) and b_l = ‖Δ_l‖² / (√2 C). By Cauchy–Schwarz Σ_l a_l² ≤ ‖Δ‖²/2 ≤ C²/2 and
    Σ_l b_l² ≤ ‖Δ‖⁴/(2C²) ≤ C²/2, so the vector (a, b) has L2 norm ≤ C: sensitivity C, like an update."""
    a = [u.double().sum() / math.sqrt(2 * u.numel()) for u in update]
    b = [(u.double() ** 2).sum() / (math.sqrt(2) * clip) for u in update]
    return torch.stack(a + b)


@dataclass
class RandomPrior:
    """Per-tensor mean and standard deviation of the updates' entries, from privatised statistics only."""

    means: list[float]
    stds: list[float]

    @classmethod
    def from_statistics(cls, average: torch.Tensor, numels: list[int], clip: float, var_floor: float) -> RandomPrior:
        """Invert `client_statistics` on the (noised) average report; variances are floored at `var_floor`."""
        k = len(numels)
        means = [float(average[i]) * math.sqrt(2 / d) for i, d in enumerate(numels)]
        second = [float(average[k + i]) * math.sqrt(2) * clip / d for i, d in enumerate(numels)]
        stds = [math.sqrt(max(s - m * m, var_floor)) for m, s in zip(means, second)]
        return cls(means, stds)

    def sample(self, index: int, rows: int, chunk: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(rows, chunk, generator=generator)
        return z * self.stds[index] + self.means[index]


class ChunkCodec(nn.Module):
    """One tensor's codec: chunks of `chunk` entries, a linear encoder (codes add up), an MLP decoder.

    Entries are divided by a fixed public `scale` (the prior's RMS) before encoding and multiplied back
    after decoding; both are linear maps, so E stays linear."""

    def __init__(self, numel: int, chunk: int, code: int, hidden: int, scale: float):
        super().__init__()
        self.numel, self.chunk, self.rows = numel, chunk, math.ceil(numel / chunk)
        self.encoder = nn.Linear(chunk, code, bias=False)
        self.decoder = (nn.Sequential(nn.Linear(code, hidden), nn.GELU(), nn.Linear(hidden, chunk)) if hidden
                        else nn.Linear(code, chunk))
        self.skip = nn.Linear(code, chunk, bias=False) if hidden else None
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def code_numel(self) -> int:
        return self.rows * self.encoder.out_features

    def chunks(self, flat: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(flat, (0, self.rows * self.chunk - self.numel)).view(self.rows, self.chunk)

    def encode_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        return self.encoder(chunks / self.scale)

    def decode_chunks(self, code: torch.Tensor) -> torch.Tensor:
        out = self.decoder(code) + (self.skip(code) if self.skip is not None else 0)
        return out * self.scale

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.encode_chunks(self.chunks(tensor.reshape(-1).float()))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decode_chunks(code).reshape(-1)[: self.numel]


class GradientAutoEncoder(nn.Module):
    """One `ChunkCodec` per trainable tensor; trained on synthetic updates from a `RandomPrior` only.

    It stays float32 whatever `trainer.precision` casts the model to: it codes float32 updates, and a half
    precision codec would round the noised sum it decodes. Moves to another device apply."""

    def __init__(self, shapes: list[torch.Size], compression: int, chunk: int, hidden: int):
        super().__init__()
        if not (isinstance(compression, int) and 1 <= compression <= chunk):
            raise ValueError(f"method.encoder.compression={compression} is invalid: must be an integer in "
                             f"[1, method.encoder.chunk={chunk}]")
        self.shapes = [torch.Size(s) for s in shapes]
        self.compression, self.chunk, self.hidden = compression, chunk, hidden
        self.code = chunk // compression
        self.codecs = nn.ModuleList(ChunkCodec(math.prod(s), chunk, self.code, hidden, 1.0) for s in self.shapes)
        self.loss_history: list[float] = []
        self.requires_grad_(False)

    def _apply(self, fn, recurse: bool = True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(device=out.device) if t.dtype == torch.float32 and out.dtype != torch.float32 else out

        return super()._apply(keep_float32, recurse)

    @property
    def code_numel(self) -> int:
        """Numbers one client uploads per round."""
        return sum(c.code_numel for c in self.codecs)

    def encode(self, update: list[torch.Tensor]) -> list[torch.Tensor]:
        return [codec.encode(u) for codec, u in zip(self.codecs, update)]

    def decode(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [codec.decode(c).reshape(s) for codec, c, s in zip(self.codecs, codes, self.shapes)]

    @torch.enable_grad()
    def fit(self, prior: RandomPrior, seed: int, steps: int, lr: float, rows: int) -> list[float]:
        """Adam on the reconstruction error of fresh synthetic chunks (`rows` per tensor and step), drawn from
        `prior` with a generator seeded by `seed`; returns the mean squared error (in prior-std units) per step."""
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(int(seed))
        for codec, mean, std in zip(self.codecs, prior.means, prior.stds):
            codec.scale.fill_(math.sqrt(mean * mean + std * std))
        self.requires_grad_(True)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for index, codec in enumerate(self.codecs):
                x = prior.sample(index, rows, codec.chunk, generator).to(device)
                error = codec.decode_chunks(codec.encode_chunks(x)) - x
                loss = loss + (error / prior.stds[index]).pow(2).mean() / len(self.codecs)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
        self.requires_grad_(False)
        self.loss_history = history
        return history


class FederatedLoRA(MethodModule):
    """FedAvg (`aggregation=mean`), DP-FedAvg (`noisy_sum`) and DR-Encoder (`encoded`); one step = one round.

    Gaussian noise only: a client's contribution is bounded in L2."""

    noise_mechanisms = ("gaussian",)

    def __init__(self, *args: Any, fed: dict, aggregation: str = "mean", clip: float | None = None,
                 seed: int = 0, server_optimizer: str = "sgd", server_lr: float = 1.0,
                 privacy: PrivacySpec | None = None, prior_rounds: int = 0, encoder: dict | None = None,
                 sampling_seed: int | None = None, noise_placement: str = "split", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"method.aggregation={aggregation!r} is not one of {AGGREGATIONS}")
        if (privacy is None) != (aggregation == "mean"):
            raise ValueError(f"method.aggregation={aggregation} is {'not ' if privacy is None else ''}private")
        if privacy is not None and privacy.clip != clip:
            raise ValueError("the privacy statement was calibrated for another clip")
        if privacy is not None:
            self.check_mechanism(privacy.mechanism)
        if noise_placement not in NOISE_PLACEMENTS or (noise_placement == "local") != bool(privacy and privacy.local):
            raise ValueError(f"method.noise_placement={noise_placement!r} does not match the privacy statement")
        if noise_placement == "local" and aggregation != "encoded":
            raise ValueError("method.noise_placement=local is DR-Encoder's (method.aggregation=encoded)")
        self.noise_placement = noise_placement
        self.fed = dict(fed)
        self.aggregation, self.clip, self.seed = aggregation, clip, seed
        # who is sampled and which examples a client's local steps read (secure mode: a secret, see dpft.train)
        self.sampling_seed = seed if sampling_seed is None else sampling_seed
        self.server_optimizer, self.server_lr = server_optimizer, server_lr
        self.privacy, self.prior_rounds = privacy, prior_rounds if aggregation == "encoded" else 0
        self.ledger = PrivacyLedger(privacy) if privacy is not None else None
        self.noise = NoiseSource("gaussian", derive_seed(seed, _NOISE), secure=bool(privacy and privacy.secure_mode))
        self.encoder_options = dict(encoder or {})
        shapes = [p.shape for p in self.trainable_parameters()]
        self.autoencoder = None
        if aggregation == "encoded":
            opts = self.encoder_options
            self.autoencoder = GradientAutoEncoder(shapes, int(opts.get("compression", 8)),
                                                   int(opts.get("chunk", 64)), int(opts.get("hidden", 64)))
        self.prior: RandomPrior | None = None
        self.update_numel = sum(math.prod(s) for s in shapes)
        self.clients: list[list[Example]] = []
        self.sampled: list[int] = []  # clients per round (stage 2)
        self.round_bytes: list[int] = []  # bytes the round's clients sent, counted on the tensors sent
        self.prior_upload_bytes = 0
        self.nonfinite_clients = 0

    # --- clients ------------------------------------------------------------------------------------
    def local_update(self, client: int, round_seed: int) -> tuple[list[torch.Tensor], float]:
        """Client `client`'s Δ after local SGD from the current global weights (which are then restored)."""
        params = self.trainable_parameters()
        start = [p.detach().clone() for p in params]
        shard = self.clients[client]
        generator = torch.Generator().manual_seed(derive_seed(round_seed, client))
        batch_size = min(int(self.fed["local_batch_size"]), len(shard))
        losses = []
        with torch.enable_grad():
            for _ in range(int(self.fed["local_steps"])):
                picks = torch.randperm(len(shard), generator=generator)[:batch_size].tolist()
                batch = self.trainer.datamodule.transfer_batch_to_device(
                    self.scorer.collate([shard[i] for i in picks], train=True), self.device, 0)
                loss = self.per_example_losses(batch).mean()
                if self.ledger is None:  # private runs must not stop on what a client's data do: see below
                    self.check_finite(loss, self.steps_done)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=-self.lr)
                losses.append(float(loss.detach()))
        with torch.no_grad():
            update = [p.detach() - s for p, s in zip(params, start)]
            for p, s in zip(params, start):
                p.copy_(s)
        if self.ledger is not None and not all(torch.isfinite(u).all() for u in update):
            self.nonfinite_clients += 1  # a diverged client contributes nothing (its clipped update would be NaN)
            update = [torch.zeros_like(u) for u in update]
        return update, sum(losses) / len(losses)

    # --- stage 1: the random prior ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.clients = self.trainer.datamodule.clients
        if self.autoencoder is not None and self.prior is None:
            self.build_prior()
            opts = self.encoder_options
            self.autoencoder.fit(self.prior, derive_seed(self.seed, _AUTOENCODER), int(opts.get("steps", 300)),
                                 float(opts.get("lr", 1e-3)), int(opts.get("rows", 256)))
            history = self.autoencoder.loss_history
            if self.logger is not None and history:
                self.logger.log_metrics({"encoder/loss_first": history[0], "encoder/loss_last": history[-1]}, step=0)

    def build_prior(self) -> None:
        """`prior_rounds` Poisson-sampled rounds of privatised statistics (each charged to the ledger)."""
        n, m = len(self.clients), self.privacy.expected_batch_size
        numels = [math.prod(s) for s in self.autoencoder.shapes]
        total = torch.zeros(2 * len(numels), dtype=torch.float64)
        for r in range(self.prior_rounds):
            self.ledger.step()
            generator = torch.Generator().manual_seed(derive_seed(derive_seed(self.sampling_seed, _PRIOR_SAMPLING), r))
            chosen = (torch.rand(n, generator=generator) < self.privacy.sample_rate).nonzero().flatten().tolist()
            round_sum = torch.zeros_like(total)
            std = self.privacy.noise_multiplier * self.clip
            for client in chosen:
                update, _ = self.local_update(client, derive_seed(self.sampling_seed, -1 - r))
                round_sum += client_statistics([u.cpu() for u in clip_update(update, self.clip)], self.clip)
                if self.noise_placement == "local":  # each client's statistics private on their own
                    round_sum += self.noise.sample(std, tuple(round_sum.shape))
            self.prior_upload_bytes += len(chosen) * round_sum.numel() * 4
            if self.noise_placement == "split":
                round_sum += self.noise.sample(std, tuple(round_sum.shape))
            total += round_sum / m
        floor = float(self.encoder_options.get("var_floor", 1e-2)) * self.clip ** 2 / self.update_numel
        self.prior = RandomPrior.from_statistics(total / self.prior_rounds, numels, self.clip, floor)

    # --- stage 2: rounds ----------------------------------------------------------------------------
    def configure_optimizers(self):
        return make_optimizer(self.server_optimizer, self.trainable_parameters(), self.server_lr)

    def noise_like(self, tensors: list[torch.Tensor], std: float) -> list[torch.Tensor]:
        noise = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        self.noise.add_to(noise, [std] * len(noise))  # drawn on each tensor's device, over threads on CPU
        return noise

    def aggregate(self, updates: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The round's Δ̄ from the clients' updates (a list per client; may be empty for private rounds)."""
        params = self.trainable_parameters()
        if self.aggregation == "mean":
            return [torch.stack(parts).mean(0) for parts in zip(*updates)]
        m = self.privacy.expected_batch_size
        std = self.privacy.noise_multiplier * self.clip
        clipped = [clip_update(u, self.clip) for u in updates]
        if self.aggregation == "noisy_sum":
            total = self.noise_like(params, std)
            for update in clipped:
                total = [t + u for t, u in zip(total, update)]
            return [t / m for t in total]
        # encoded: each client adds its share of the one noise draw (local: the full draw) before encoding; the
        # server adds the codes
        share = std / math.sqrt(len(clipped)) if clipped and self.noise_placement == "split" else std
        uploads = [self.autoencoder.encode([u + n for u, n in zip(update, self.noise_like(update, share))])
                   for update in clipped]
        self.round_bytes.append(sum(c.numel() * c.element_size() for codes in uploads for c in codes))
        uploads = uploads or [self.autoencoder.encode(self.noise_like(params, share))]  # empty round: the server's draw
        code_sum = [torch.stack(parts).sum(0) for parts in zip(*uploads)]
        return self.autoencoder.decode([c / m for c in code_sum])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        if self.ledger is not None:
            self.ledger.step()  # before any client touches its data: never past the budget
        clients = list(batch["clients"])
        round_seed = derive_seed(derive_seed(self.sampling_seed, _LOCAL), self.steps_done)
        results = [self.local_update(c, round_seed) for c in clients]
        updates = [u for u, _ in results]
        if self.aggregation != "encoded":
            self.round_bytes.append(sum(t.numel() * t.element_size() for u in updates for t in u))
        with torch.no_grad():
            mean_update = self.aggregate(updates)
        optimizer.zero_grad(set_to_none=True)
        for p, u in zip(self.trainable_parameters(), mean_update):
            p.grad = -u.to(p.dtype)  # the server optimizer descends the pseudo-gradient −Δ̄
        optimizer.step()
        self.sampled.append(len(clients))
        loss = torch.tensor(sum(value for _, value in results) / len(results) if results else math.nan)
        if results:
            self.log_raw("train/loss", loss, prog_bar=True, batch_size=1)
        self.log_raw("fed/clients", float(len(clients)), batch_size=1)
        self.log_raw("fed/upload_bytes", float(self.round_bytes[-1]), batch_size=1)
        # the applied update: noised in private runs
        self.log("fed/update_norm", float(flat_norm(mean_update)), batch_size=1)
        return loss

    # --- checkpoints and results --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["federated"] = {"sampled": self.sampled, "round_bytes": self.round_bytes,
                                   "nonfinite_clients": self.nonfinite_clients,
                                   "prior_upload_bytes": self.prior_upload_bytes, "noise": self.noise.state_dict(),
                                   "prior": None if self.prior is None else vars(self.prior),
                                   "encoder_loss": self.autoencoder.loss_history if self.autoencoder else None}
        if self.ledger is not None:
            checkpoint["privacy_ledger"] = self.ledger.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["federated"]
        self.sampled, self.round_bytes = list(state["sampled"]), list(state["round_bytes"])
        self.prior_upload_bytes = int(state["prior_upload_bytes"])
        self.nonfinite_clients = int(state["nonfinite_clients"])
        self.noise.load_state_dict(state["noise"])
        self.prior = RandomPrior(**state["prior"]) if state["prior"] else None  # the trained codec is in the weights
        if self.autoencoder is not None:
            self.autoencoder.loss_history = list(state["encoder_loss"] or [])
        if self.ledger is not None:
            self.ledger.load_state_dict(checkpoint["privacy_ledger"])

    def communication(self) -> dict[str, Any]:
        """Upload sizes: per client and the expected per round (data-independent), and in runs that may release
        raw statistics (`releases_raw`) the realised per-round counts, which reveal how many clients were sampled."""
        per_client = (self.autoencoder.code_numel if self.autoencoder is not None else self.update_numel) * 4
        out = {
            "rounds": len(self.sampled),
            "upload_bytes_per_client": per_client,
            "update_bytes_per_client": self.update_numel * 4,
            "compression_ratio": self.update_numel * 4 / per_client,
            "expected_upload_bytes_per_round": per_client * (self.privacy.expected_batch_size if self.privacy
                                                             else int(self.fed["clients_per_round"])),
        }
        return {**out, **self._realised_communication()} if self.ledger is None else out

    def _realised_communication(self) -> dict[str, Any]:
        rounds, total = len(self.sampled), sum(self.round_bytes)
        return {"clients_sampled": sum(self.sampled), "upload_bytes_total": total,
                "upload_bytes_mean_per_round": total / rounds if rounds else 0.0,
                "prior_upload_bytes": self.prior_upload_bytes, "clients_per_round": self.sampled,
                "upload_bytes_per_round": self.round_bytes}

    def raw_statistics(self) -> dict[str, Any]:
        if self.ledger is None:
            return {}
        return {"nonfinite_client_updates": self.nonfinite_clients,
                **{f"communication/{k}": v for k, v in self._realised_communication().items()}}

    def extra_results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"communication": self.communication()}
        if self.autoencoder is not None:
            history = self.autoencoder.loss_history
            out["encoder"] = {"compression": self.autoencoder.compression, "chunk": self.autoencoder.chunk,
                              "code": self.autoencoder.code, "hidden": self.autoencoder.hidden,
                              "loss_first": history[0] if history else None,
                              "loss_last": history[-1] if history else None,
                              "prior": None if self.prior is None else vars(self.prior)}
        return out

    def privacy_block(self) -> dict[str, Any]:
        if self.ledger is None:
            return {**super().privacy_block(), "sampling": "clients_per_round clients without replacement"}
        block = self.ledger.report()
        block["prior_rounds"] = self.prior_rounds
        block["noise_placement"] = {
            "noisy_sum": "server, on the sum", "encoded": "split over the round's clients before encoding"}[
            self.aggregation] if self.noise_placement == "split" else "each client, the full σC, before encoding"
        return block

    def hyperparameters(self) -> dict[str, Any]:
        out = {**super().hyperparameters(), "aggregation": self.aggregation, "clip": self.clip,
               "server_optimizer": self.server_optimizer, "server_lr": self.server_lr, "fed": self.fed}
        if self.autoencoder is not None:
            out["encoder"], out["noise_placement"] = self.encoder_options, self.noise_placement
        return out
