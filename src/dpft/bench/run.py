"""`dpft-bench`: speed ratios, each measured side by side in one process on the same batch, and memory ratios.

    dpft-bench --quick --out bench.json     # OPT-125m shape, batch 16, length 128 (a few minutes on CPU)
    dpft-bench --out bench.json             # shapes × lengths {64, 256} × batches {8, 32}
    dpft-bench --only zo --lengths 64 --batches 8   # a part of the grid: the ZO timings (and scaling) of 3 shapes

Ratios (`name` in bench.json):
- zo_step_over_two_forwards       a ZO step (MeZO / DP-ZO / DPZero) over two plain forward passes (target 1.15)
- zo_peak_memory_over_inference   peak memory of a ZO step over that of one forward (each in a fresh process)
- zo_step_torch_z_over_two_forwards   the same for MeZO with z_generator=torch (torch's Mersenne Twister, not
                                  the Philox kernel): what the kernel gains, side by side
- zo_step_over_mezo_reference     our MeZO step over a step written as the public MeZO code does it (its loss:
                                  logits at every position, where ours computes the output layer at the label's)
- zo_step_over_mezo_reference_same_loss   the same with our loss in the reference: what the update alone gains
- dpsgd_step_over_nonprivate      our DP-AdamW step (full / LoRA) over a non-private AdamW step
- opacus_step_over_nonprivate     Opacus's hook-based DP step over the same non-private step (or why it did not run)
- dpsgd_step_over_opacus          our DP step over Opacus's, same batch and run (target 1.0: at or below Opacus)
- zo_seconds_per_step             seconds per MeZO step against parameter count (scaling; ratio = s / 1e8 params)
- ddp_scaling_efficiency          steps/s of data-parallel DP-ZO with 2 processes (gloo, CPU) over 1 process
- zo_restore_drift_200_steps, zo_update_relative_error   per dtype of the trained weights (`dpft.bench.precision`)
Timings are medians of interleaved repeats after a warm-up, so drift hits both sides; each repeat runs the
functions in an order of Williams' design (`balanced_orders`), so none always follows the same neighbour.
On glibc, malloc's thresholds are fixed first (`keep_freed_memory`), so no contender pays for its neighbour's heap.
Random weights of the real shapes: speed does not depend on the values. Every step computes the suite's
classification loss: cross-entropy over two label words at one position per example.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from dpft.bench.precision import bench_precision
from dpft.config import CONFIG_DIR
from dpft.methods.zeroth_order import GradientEstimator, PrivateEstimator, ZerothOrderSGD
from dpft.models.loading import load_model
from dpft.models.precision import cast_trainable
from dpft.models.scoring import logits_at

TARGETS = {"zo_step_over_two_forwards": 1.15, "zo_peak_memory_over_inference": 1.05,
           "zo_step_over_mezo_reference": 0.8, "dpsgd_step_over_nonprivate": 1.5, "dpsgd_step_over_opacus": 1.0}


# --- models and batches ------------------------------------------------------------------------
def build(shape: str, device: str) -> nn.Module:
    """Random weights of the shape: on CUDA in the GPU configurations' dtypes (the YAML's frozen dtype, fp32 trained
    weights: every weight trains in these steps; the losses run under bf16 autocast), on CPU in float32."""
    cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{shape}.yaml")
    cfg.pretrained = None
    if not device.startswith("cuda"):
        cfg.dtype = "float32"
    return cast_trainable(load_model(cfg), cfg).to(device).eval()


def gpu_autocast(batch: dict[str, torch.Tensor]):
    """trainer=gpu's bf16-mixed autocast for a batch on CUDA; nothing on CPU."""
    ids = batch["input_ids"]
    return torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda)


LABEL_WORDS = [1000, 2000]  # two label words, as in the suite's binary tasks


def make_batch(model: nn.Module, batch: int, length: int, device: str) -> dict[str, torch.Tensor]:
    """Random token ids and labels; the label word is read at the last token of a causal model (OPT, Llama, ...:
    the MeZO prompts) or at a mask in the middle of a masked one (RoBERTa, LM-BFF)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (batch, length), generator=gen)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    at = length // 2 if type(inner).__name__.endswith("ForMaskedLM") else length - 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "at": torch.full((batch, 1), at, device=device),
            "labels": torch.randint(0, len(LABEL_WORDS), (batch,), generator=gen).to(device)}


def _label_word_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the label words' log-likelihoods ([B, V] logits at the label position)."""
    return F.cross_entropy(torch.log_softmax(logits.float(), -1)[:, LABEL_WORDS], labels, reduction="none")


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor], head: nn.Module | None = None) -> torch.Tensor:
    """The suite's classification loss, per example: the output layer (`head`, for wrapped models) only at the
    label position, as the scorers compute it in training."""
    with gpu_autocast(batch):
        return _label_word_losses(logits_at(model, batch, batch["at"], head)[:, 0], batch["labels"])


def mezo_reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same loss the way the public MeZO code computes it: logits and log-softmax at every position,
    then the label position picked out."""
    with gpu_autocast(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    return _label_word_losses(logp[torch.arange(logp.shape[0]), batch["at"][:, 0]], batch["labels"])


# --- timing --------------------------------------------------------------------------------------
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl's mallopt does nothing


def keep_freed_memory() -> bool:
    """Freed blocks stay in glibc's heap for the next call instead of going back to the kernel; True if set.

    Side by side, contenders alternate, and glibc sizes its heap to the last one: it maps blocks above an adaptive
    threshold by themselves and hands back the heap's free top, so the contender that holds the most re-faults
    its memory in after each smaller one. At OPT-125m 8 × 256 a DP step right after a non-private one faulted in
    750 MB (6.9 GB at 32 × 256); run after itself, as in training, 0-89 MB. Both thresholds are fixed high
    (setting one alone stops glibc adapting the other): blocks up to 1 GiB come from the heap, and a trim threshold
    of -1 turns trimming off (the largest positive one, 2 GiB, still let 4.5 GB fault in per DP step at 32 × 256);
    each point starts from a trimmed heap (`release_heap`).
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, -1))


def release_heap() -> None:
    """Hand the heap's free memory back to the kernel (between points: one point's peak is not the next's)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def balanced_orders(n: int) -> list[list[int]]:
    """Williams' design: orders of n functions in which each runs right after every other one equally often
    (once over the n orders for even n, twice over 2n for odd n). A rotation would not do: it keeps every
    function's neighbour, so whatever state one call leaves (heap, caches, threads) always lands on the same
    next one. For odd n the design's orders are rotations, so each is followed by its reverse: consecutive
    orders share no neighbours, which counts when the repeats are fewer than the orders."""
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    orders = [[(i + r) % n for i in first] for r in range(n)]
    return orders if n % 2 == 0 else [o for order in orders for o in (order, order[::-1])]


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int, device: str,
                 warmed: tuple[str, ...] = ()) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds of each function, and every timing, after one warm-up call each (`warmed`: already
    called). Repeat r runs the functions in `balanced_orders`' order r (cycling), so none always runs first
    or after the same neighbour."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for key, fn in fns.items():
        if key not in warmed:
            fn()
    keys = list(fns)
    orders = balanced_orders(len(keys))
    for r in range(repeats):
        for key in (keys[i] for i in orders[r % len(orders)]):
            _sync(device)
            start = time.perf_counter()
            fns[key]()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, times


def mezo_reference_step(model: nn.Module, batch: dict, seed: int, eps: float = 1e-3, lr: float = 1e-6,
                        weight_decay: float = 0.0, loss_fn: Callable = mezo_reference_loss) -> None:
    """The public MeZO code's step (its `zo_step` + `zo_update`): global reseeding, four regenerations of z,
    out-of-place updates of `param.data` (outside inference mode, as there: weights made under it could not be
    updated in place afterwards), the decay term written out for weights but not biases or layer norms,
    forwards under `torch.inference_mode()`, its loss (`mezo_reference_loss`) unless `loss_fn` says."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return loss_fn(model, batch).mean()

    with torch.no_grad():
        perturb(1)
        loss1 = forward()
        perturb(-2)
        loss2 = forward()
        grad = float((loss1 - loss2) / (2 * eps))
        perturb(1)
        torch.manual_seed(seed)
        for name, p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                p.data = p.data - lr * (grad * z + weight_decay * p.data)
            else:
                p.data = p.data - lr * (grad * z)


def zo_optimizer(model: nn.Module, method: str, batch_size: int, z_generator: str = "philox") -> ZerothOrderSGD:
    estimator = {"mezo": GradientEstimator(),
                 "dpzo": PrivateEstimator(0.05, "difference", 1.0, "gaussian", batch_size, seed=0),
                 "dpzero": PrivateEstimator(100.0, "normalized", 1.0, "gaussian", batch_size, seed=0)}[method]
    return ZerothOrderSGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, eps=1e-3, seed=0,
                          estimator=estimator, z_generator=z_generator)


# --- measurements --------------------------------------------------------------------------------
def record(name: str, method: str, shape: str, params: int, batch: int, length: int, device: str,
           medians: dict[str, float], numerator: str, denominator: str, **extra: Any) -> dict[str, Any]:
    """One measurement; `extra` may carry `times` (every timing of each function the medians come from), and
    then the record carries the ratio of each repeat's two timings too (`repeat_ratios`: taken minutes apart at
    most, so slow drift of the machine cancels in each)."""
    ratio = medians[numerator] / medians[denominator]
    times = extra.get("times") or {}
    if numerator in times and denominator in times:
        extra["repeat_ratios"] = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {"name": name, "method": method, "model_shape": shape, "params": params, "batch_size": batch,
            "seq_len": length, "device": device, "ratio": ratio, "target": TARGETS.get(name),
            "medians": medians, "numerator": numerator, "denominator": denominator, **extra}


def bench_zo(shape: str, batch: int, length: int, device: str, repeats: int) -> list[dict[str, Any]]:
    release_heap()
    model = build(shape, device)
    data = make_batch(model, batch, length, device)
    params = sum(p.numel() for p in model.parameters())
    optimizers = {m: zo_optimizer(model, m, batch) for m in ("mezo", "dpzo", "dpzero")}

    def two_forwards() -> None:
        with torch.no_grad():
            per_example_loss(model, data)
            per_example_loss(model, data)

    fns: dict[str, Callable[[], Any]] = {"two_forwards": two_forwards}
    steps = {f"{m}_step": opt for m, opt in optimizers.items()}
    steps["mezo_step_torch_z"] = zo_optimizer(model, "mezo", batch, z_generator="torch")
    for name, opt in steps.items():
        fns[name] = lambda opt=opt: opt.step(lambda: per_example_loss(model, data))
    fns["mezo_reference_step"] = lambda: mezo_reference_step(model, data, seed=1)
    fns["mezo_reference_step_our_loss"] = lambda: mezo_reference_step(model, data, seed=1, loss_fn=per_example_loss)
    medians, times = side_by_side(fns, repeats, device)
    point = (shape, params, batch, length, device, medians)
    out = [record("zo_step_over_two_forwards", m, *point, f"{m}_step", "two_forwards", times=times,
                  z_generator=opt.z_generator) for m, opt in optimizers.items()]
    out.append(record("zo_step_torch_z_over_two_forwards", "mezo", *point, "mezo_step_torch_z", "two_forwards",
                      times=times, z_generator="torch"))
    out.append(record("zo_step_over_mezo_reference", "mezo", *point, "mezo_step", "mezo_reference_step", times=times))
    # the part of that gain the update alone makes (the reference step with our loss)
    out.append(record("zo_step_over_mezo_reference_same_loss", "mezo", *point, "mezo_step",
                      "mezo_reference_step_our_loss", times=times))
    out.append({**record("zo_seconds_per_step", "mezo", *point, "mezo_step", "two_forwards", times=times),
                "ratio": medians["mezo_step"] / (params / 1e8),
                "repeat_ratios": [t / (params / 1e8) for t in times["mezo_step"]]})
    return out


def peak_memory(fn: Callable[[], Any], device: str) -> float:
    """Peak memory while `fn` runs: allocated bytes on GPU; on CPU the process's peak RSS (VmHWM), reset before
    the call through /proc/self/clear_refs (Linux) once freed heap memory is handed back (`malloc_trim`), so
    the peak starts from live memory and not from what an earlier call left cached."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    release_heap()
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _proc_bytes("/proc/self/status", "VmHWM")


def _proc_bytes(path: str, field: str) -> float:
    """A `field: N kB` line of a /proc file, in bytes."""
    return float(next(line.split()[1] for line in Path(path).read_text().splitlines()
                      if line.startswith(field + ":"))) * 1024


def _peak_of(kind: str, shape: str, batch: int, length: int, device: str) -> tuple[float, int]:
    """In a fresh process: the model and batch, one warm-up call (lazy buffers), then the peak of a second
    call of one forward (`inference`) or of a DP-ZO step (`zo_step`), weights included. On CPU every block
    from 128 KiB up is its own mapping (glibc's mmap threshold fixed), so RSS follows live tensors: with the
    threshold left to adapt, the same forward's peak varied by ±100 MB from process to process. Returns (peak
    bytes, parameter count)."""
    libc = _glibc() if device == "cpu" else None
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    model = build(shape, device)
    data = make_batch(model, batch, length, device)
    if kind == "zo_step":
        opt = zo_optimizer(model, "dpzo", batch)
        fn = lambda: opt.step(lambda: per_example_loss(model, data))  # noqa: E731
    else:
        fn = torch.no_grad()(lambda: per_example_loss(model, data))
    fn()
    return peak_memory(fn, device), sum(p.numel() for p in model.parameters())


def bench_memory(shape: str, batch: int, length: int, device: str) -> dict[str, Any]:
    """Peak memory of a DP-ZO step over that of one forward pass on the same batch, each in its own process
    (so neither sees memory the other's buffers or caches hold)."""
    import torch.multiprocessing as mp

    peaks = {}
    for kind in ("inference", "zo_step"):
        with mp.get_context("spawn").Pool(1) as pool:
            peaks[kind], params = pool.apply(_peak_of, (kind, shape, batch, length, device))
    return record("zo_peak_memory_over_inference", "dpzo", shape, params, batch, length, device, peaks, "zo_step",
                  "inference", unit="bytes", measure="peak RSS (VmHWM)" if device == "cpu" else "peak allocated")


def bench_dpsgd(shape: str, batch: int, length: int, device: str, repeats: int) -> list[dict[str, Any]]:
    return [r for mode in ("full", "lora") for r in _bench_dpsgd_mode(shape, mode, batch, length, device, repeats)]


def dp_model(shape: str, mode: str, device: str) -> nn.Module:
    """A fresh model for one contender: full (all but embeddings) or LoRA r=8 trainable, in training mode with
    dropout off (so each step computes what inference does, and Opacus, which records only modules in
    training mode, sees every layer). The LM head's output bias (RoBERTa's, tied to its decoder) stays frozen:
    Opacus cannot hook a parameter that a module owns beside a Linear that uses it."""
    from dpft.models.peft import apply_peft, select_trainable

    peft_cfg = OmegaConf.create({"mode": "lora" if mode == "lora" else "none", "r": 8, "alpha": 16})
    model = select_trainable(apply_peft(build(shape, device), peft_cfg), "no_embeddings" if mode == "full" else "all")
    head_bias = getattr(getattr(model, "lm_head", None), "bias", None)
    if isinstance(head_bias, nn.Parameter):
        head_bias.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def _bench_dpsgd_mode(shape: str, mode: str, batch: int, length: int, device: str,
                      repeats: int) -> list[dict[str, Any]]:
    """Non-private AdamW, our DP-AdamW and Opacus's, each on its own copy of the model (so hooks and memory
    layout are each one's own), on the same batch."""
    from dpft.methods.dp_first_order import DPOptimizer
    from dpft.privacy.noise import NoiseSource
    from dpft.privacy.per_example import PerExampleGradients

    release_heap()

    plain, ours = dp_model(shape, mode, device), dp_model(shape, mode, device)
    data = make_batch(plain, batch, length, device)
    plain_adam = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5)
    params = [p for p in ours.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=1e-5)
    per_example = PerExampleGradients(ours, params)
    dp = DPOptimizer(per_example, params, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                     noise=NoiseSource("gaussian", 0, device))

    # each step frees its gradients when done (as Opacus's per-sample ones are, below), so no contender's memory
    # stays resident while another one runs
    def nonprivate() -> None:
        per_example_loss(plain, data).mean().backward()
        plain_adam.step()
        plain_adam.zero_grad(set_to_none=True)

    def private() -> None:
        with per_example.capture(batch):
            losses = per_example_loss(ours, data)
        per_example.backward(losses.sum())
        dp.pre_step(empty=False)
        adam.step()
        adam.zero_grad(set_to_none=True)

    fns = {"nonprivate_step": nonprivate, "dpsgd_step": private}
    opacus_fn, opacus_error = _opacus_step(shape, mode, batch, data, device)  # on OPT, only LoRA runs
    if opacus_fn is not None:
        fns["opacus_step"] = opacus_fn
    medians, times = side_by_side(fns, repeats, device, warmed=("opacus_step",))
    point = (shape, sum(p.numel() for p in ours.parameters()), batch, length, device, medians)
    trainable = sum(p.numel() for p in params)
    out = [record("dpsgd_step_over_nonprivate", f"dpsgd_{mode}", *point, "dpsgd_step", "nonprivate_step",
                  times=times, trainable=trainable)]
    if "opacus_step" in medians:
        out.append(record("opacus_step_over_nonprivate", f"opacus_{mode}", *point, "opacus_step", "nonprivate_step",
                          times=times, trainable=trainable))
        out.append(record("dpsgd_step_over_opacus", f"dpsgd_{mode}", *point, "dpsgd_step", "opacus_step",
                          times=times, trainable=trainable))
    elif opacus_error:
        out.append({"name": "opacus_step_over_nonprivate", "method": f"opacus_{mode}", "model_shape": shape,
                    "params": point[1], "batch_size": batch, "seq_len": length, "device": device, "ratio": None,
                    "target": None, "medians": {}, "error": opacus_error, "trainable": trainable})
    per_example.remove()
    return out


def _free_memory(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info()[0])
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _opacus_step(shape: str, mode: str, batch: int, data: dict, device: str):
    """Opacus's hook-based per-sample gradients + DPOptimizer on its own copy of the model; run once here
    (the warm-up), or the reason it cannot run."""
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer as OpacusDPOptimizer

        model = dp_model(shape, mode, device)
        if mode == "full" and model.config.model_type == "opt":
            return None, ("not run: OPT's decoder flattens the tokens into the batch dimension before its MLP, so "
                          "Opacus's hooks on fc1/fc2 take each of the batch × length tokens for an example (out of "
                          "memory at OPT-125m, 'stack expects each tensor to be equal size' where it fits)")
        params = [p for p in model.parameters() if p.requires_grad]
        # Opacus stores every example's gradient of every trainable weight (grad_sample) at once
        need = batch * sum(p.numel() * p.element_size() for p in params)
        if need > _free_memory(device) / 2:
            return None, (f"skipped: Opacus would hold {need / 2**30:.1f} GiB of per-sample gradients "
                          f"(batch {batch} × the trainable weights), over half the free memory")
        gsm = GradSampleModule(model)
        opt = OpacusDPOptimizer(torch.optim.AdamW(params, lr=1e-5), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=batch)

        def step() -> None:
            per_example_loss(gsm, data, head=model.get_output_embeddings()).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # frees the per-sample gradients (batch × the trainable weights)

        step()
        return step, None
    except Exception as err:  # Opacus does not support every architecture here
        return None, f"{type(err).__name__}: {str(err)[:200]}"


def _ddp_worker(rank: int, port: int, world: int, shape: str, batch: int, length: int, repeats: int,
                out: str, kept: bool) -> None:
    """One data-parallel process: its share of the batch, scalar all-reduce in the estimator; the allocator set
    as in the parent (`kept`: `keep_freed_memory()` was called)."""
    import os

    import torch.distributed as dist

    if kept:
        keep_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    model = build(shape, "cpu")
    data = make_batch(model, batch, length, "cpu")
    share = {k: v[rank::world] if torch.is_tensor(v) else v for k, v in data.items()}
    opt = zo_optimizer(model, "dpzo", batch)
    step = lambda: opt.step(lambda: per_example_loss(model, share))  # noqa: E731
    step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def bench_ddp(shape: str, batch: int, length: int, repeats: int, kept: bool = False, world: int = 2) -> dict[str, Any]:
    """Steps per second of data-parallel DP-ZO with `world` CPU processes (gloo) over one process, same
    global batch; the processes split the machine's threads."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    release_heap()
    model = build(shape, "cpu")
    data = make_batch(model, batch, length, "cpu")
    opt = zo_optimizer(model, "dpzo", batch)
    single, _ = side_by_side({"one_process_step": lambda: opt.step(lambda: per_example_loss(model, data))},
                             repeats, "cpu")
    with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = str(Path(tmp) / "times.json")
        mp.spawn(_ddp_worker, args=(port, world, shape, batch, length, repeats, out, kept), nprocs=world, join=True)
        ddp = statistics.median(json.loads(Path(out).read_text()))
    medians = {**single, f"{world}_process_step": ddp}
    params = sum(p.numel() for p in model.parameters())
    return {**record("ddp_scaling_efficiency", "dpzo", shape, params, batch, length, "cpu", medians,
                     "one_process_step", f"{world}_process_step"), "processes": world, "backend": "gloo"}


# --- entry point --------------------------------------------------------------------------------
SHAPES, LENGTHS, BATCHES = ("opt-tiny", "opt-125m", "roberta-base"), (64, 256), (8, 32)
PARTS = ("zo", "memory", "dpsgd", "ddp", "precision")


def run(quick: bool, device: str, repeats: int, shapes: tuple[str, ...] = SHAPES, lengths: tuple[int, ...] = LENGTHS,
        batches: tuple[int, ...] = BATCHES, parts: tuple[str, ...] = PARTS, kept: bool = False) -> list[dict[str, Any]]:
    """The chosen points' records; `kept`: this process's allocator keeps freed memory (DDP workers do the same)."""
    if quick:
        points = [("opt-125m", 16, 128)]
        dp_points = [("roberta-base", 16, 128)]
    else:
        points = [(s, b, t) for s in shapes for t in lengths for b in batches]
        dp_points = [(s, b, t) for s in shapes if s != "opt-tiny" for t in lengths for b in batches]
    records = []
    for shape, batch, length in points if "zo" in parts else []:
        print(f"[bench] zeroth-order {shape} batch={batch} len={length}", flush=True)
        records += bench_zo(shape, batch, length, device, repeats)
    for shape, batch, length in points if "memory" in parts else []:
        print(f"[bench] memory {shape} batch={batch} len={length}", flush=True)
        records.append(bench_memory(shape, batch, length, device))
    for shape, batch, length in dp_points if "dpsgd" in parts else []:
        print(f"[bench] DP-SGD {shape} batch={batch} len={length}", flush=True)
        records += bench_dpsgd(shape, batch, length, device, repeats)
    if "precision" in parts:
        print(f"[bench] zeroth-order steps in each dtype of the trained weights ({device})", flush=True)
        records += bench_precision(device)
    if device == "cpu" and "ddp" in parts:
        shape, batch, length = points[0] if quick else ("opt-125m", 16, 128)
        print(f"[bench] data-parallel DP-ZO, 2 processes vs 1, {shape} batch={batch} len={length}", flush=True)
        records.append(bench_ddp(shape, batch, length, repeats, kept))
    return records


def timing_range(r: dict[str, Any]) -> float | None:
    """The wider relative range (max - min) / median of the two timed functions a ratio divides: this
    machine's run-to-run noise, against which a ✓ or ✗ within that distance of its target means little."""
    times = r.get("times") or {}
    spans = [(max(times[k]) - min(times[k])) / statistics.median(times[k])
             for k in (r.get("numerator"), r.get("denominator")) if times.get(k)]
    return max(spans) if spans else None


def format_table(records: list[dict[str, Any]]) -> str:
    lines = ["| measurement | method | shape | batch × len | device | ratio | per repeat | target | timing range |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ratio = "n/a" if r["ratio"] is None else (f"{r['ratio']:.3f} s/1e8 params" if r["name"] == "zo_seconds_per_step"
                                                  else f"{r['ratio']:.2g}" if "dtype" in r else f"{r['ratio']:.3f}")
        target = "" if r["target"] is None else f"≤ {r['target']}"
        if r["ratio"] is not None and r["target"] is not None:
            target += " ✓" if r["ratio"] <= r["target"] else " ✗"
        spread, each = timing_range(r), r.get("repeat_ratios")
        each = f"{min(each):.3f}–{max(each):.3f}" if each else ""
        shape = f"{r['dtype']}{' (default)' if r['default'] else ''}" if "dtype" in r else r["model_shape"]
        size = f"{r['batch_size']} × {r['seq_len']}" if r["batch_size"] else "-"
        lines.append(f"| {r['name']} | {r['method']} | {shape} | {size} | "
                     f"{r['device']} | {ratio} | {each} | {target} | {'' if spread is None else f'{spread:.0%}'} |")
    return "\n".join(lines)


def buildable_shapes() -> list[str]:
    """The model configs with an architecture block (not classifiers): each can be measured with random weights."""
    configs = {p.stem: OmegaConf.load(p) for p in (CONFIG_DIR / "model").glob("*.yaml")}
    return sorted(name for name, cfg in configs.items() if cfg.get("config") and cfg.kind != "classifier")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only OPT-125m / RoBERTa-base, batch 16, length 128")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="records file (default bench.json)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: every one available)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of each measurement, in a Williams-design order (default 3)")
    parser.add_argument("--shapes", nargs="+", choices=buildable_shapes(), default=list(SHAPES),
                        help="model configs to measure with random weights (default: the grid's)")
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS),
                        help=f"sequence lengths of the grid (default {' '.join(map(str, LENGTHS))})")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES),
                        help=f"batch sizes of the grid (default {' '.join(map(str, BATCHES))})")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), dest="parts",
                        help="zo: the ZO ratios and scaling; memory: ZO peak memory over inference; dpsgd: DP-SGD and "
                             "Opacus; ddp: 2 processes vs 1; precision: ZO restore drift and update error per dtype")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds to adapt (by default they are fixed: keep_freed_memory)")
    args = parser.parse_args(argv)
    if args.quick and (args.shapes, args.lengths, args.batches) != (list(SHAPES), list(LENGTHS), list(BATCHES)):
        parser.error("--quick measures its one point; --shapes/--lengths/--batches choose points of the full grid")
    kept = not args.default_allocator and keep_freed_memory()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    records = []
    for device in devices:
        records += run(args.quick, device, args.repeats, tuple(args.shapes), tuple(args.lengths), tuple(args.batches),
                       tuple(args.parts), kept)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "allocator": "freed memory kept" if kept else "glibc default"}
    for r in records:
        r["environment"] = meta
    args.out.write_text(json.dumps(records, indent=2, default=float) + "\n")
    print(format_table(records))
    print(f"\nwrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
