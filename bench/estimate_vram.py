"""Peak device memory of a Kandinsky 5 Lite LoRA training step, estimated on a machine without a GPU.

Issue 5 asks for the peak VRAM of a LoRA rank-16 step of the full-size Kandinsky 5 Lite
transformers (Image Lite, 6 B, at 1024x1024; Video Lite, 2 B, at 512x768x61 frames; bf16, batch 1,
gradient checkpointing on). ``bench_memory.py --skip-cpu`` measures it on a GPU. This script
*estimates* it where there is none, without doing the arithmetic by hand: it runs the real step
(the trainer's own model set-up and step, as ``bench_memory.gpu_child`` does) on tensors that have
shapes and dtypes but no data, and adds up the bytes of the tensors alive after every operation.

Method
------
- ``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor is a fake one (metadata only), so
  the 6 B-parameter model costs no RAM and no operation does any arithmetic. The transformer is
  built inside the mode by ``build_kandinsky5_transformer_like_pretrained`` (bf16, the
  ``_keep_in_fp32_modules`` in fp32), then ``memory.quantize_transformer`` (optimum-quanto's int8
  tensor subclasses work under the fake mode), ``add_lora`` (fp32 LoRA, rank 16, the attention
  preset), gradient checkpointing, ``build_optimizer`` (AdamWBF16, the trainer's default); per step
  ``prepare_noisy``, bf16 autocast, ``family.predict`` (TREAD context included), ``flow_loss``,
  backward, ``clip_gradients`` and the optimizer step. Two steps run; the second one's peak is
  reported (the optimizer state exists from the first step on).
- :class:`LiveBytes`, a ``TorchDispatchMode``, sees every aten operation (autograd's backward and
  the checkpoint recomputation included), registers each new storage of the outputs with a weakref
  finaliser, so a storage counts from its allocation to its release, and records the peak of the
  sum. Storages are rounded up to 512 bytes, the CUDA caching allocator's block size, so the figure
  is the counterpart of ``torch.cuda.max_memory_allocated`` (not ``max_memory_reserved``).
- Group offload (``GroupOffloader``, block level, one block per group, no streams: the trainer turns
  them off under gradient checkpointing) runs for real, with ``offload_device="meta"`` standing in
  for the host: an offloaded weight is a meta tensor (not counted), and onloading it makes a new
  device tensor, counted until the hooks drop it and autograd no longer holds it. So the offload
  rows come out of the run, not out of a formula. As a cross-check the output also gives the
  structural figure: resident between steps + the largest block group + every non-block group
  (embeddings, output layer, RoPE tables: onloaded only while their module runs, so an upper bound)
  + the step's activations at its peak.
- Copies made *inside* a kernel are invisible to a dispatch mode. The one that matters here is
  quanto's: its int8 linear dequantises the weight into a bf16 temporary on CUDA (forward) and in
  its fallback (backward's ``grad @ weight``); :func:`dequantised_bytes` adds that copy while the
  operation runs (kind ``dequantised``, shown with the weights).
- A few bookkeeping pieces that need values run on real tensors: the caption length that
  ``predict`` groups by is a fake *constant*, and TREAD's token choice (``select_kept_tokens``,
  ``generator_from_global_rng``, both on the host in training too) runs outside the fake mode.

Validation
----------
The same step runs for real on the CPU for a ~100 M-parameter transformer (``bench_memory``'s medium
K5: 768 wide, 2 text + 8 visual blocks) at 384 visual tokens and 64 text tokens, in fp32, for each
of ``bf16`` (here fp32: no memory feature), ``int8-quanto`` and ``bf16+tread``, plus ``bf16`` with
bf16 weights and bf16 autocast (the precision of the full-size estimate). Reported per case: the
fake-mode peak, the same tracker's peak on the real run, and, independently of the tracker, the
CPU allocator's own peak over the measured step (``torch.profiler`` with ``profile_memory``: every
allocation and free of the c10 CPU allocator, kernel scratch space included) added to what was
alive when the step began. Measured here: fake and real trackers agree to the byte (8 bytes of
486 MB), and the allocator's peak is within 0.15 % of them, except int8 (2.0 % above: on the CPU
``scale * int8 weight`` casts the int8 weight to fp32 in one more temporary, which CUDA does not).

What the estimate leaves out
----------------------------
- the CUDA context and the loaded kernels (about 0.3-0.6 GB per process, outside PyTorch's
  allocator; ``nvidia-smi`` shows it, ``max_memory_allocated`` does not);
- the caching allocator's reserve and fragmentation (``max_memory_reserved`` minus
  ``max_memory_allocated``: typically 0.2-2 GB in training);
- kernel workspaces that never become tensors: cuBLAS workspaces (tens of MB), cuDNN / flash
  attention scratch;
- the attention backend: the fake run goes through the CPU's flash-attention path, which keeps the
  output and the log-sum-exp for backward exactly as CUDA flash / cuDNN / memory-efficient attention
  do, so the saved activations match; a backend that materialises the attention matrix (the math
  fallback) would need far more;
- autocast: CPU bf16 autocast stands in for CUDA's. Both run the linears and attention in bf16;
  the model casts its norms, modulation and residuals to fp32 itself, so the saved dtypes agree,
  but CUDA's list of fp32 operations is longer;
- the host tensors of the step (latent, noise: a few MB) count as device memory here;
- quanto on CUDA may pick another int8 matmul kernel (with other temporaries) than on the CPU.
So a GPU should show ``max_memory_allocated`` close to the estimate, and ``nvidia-smi`` some 1-3 GB
above it.

Full fine-tune (``--workload lumina2-full``)
-------------------------------------------
The same tracker runs a Lumina 2 ``model_type full`` step (:func:`run_full_case`): Lumina-Image-2.0's
real transformer config (2.6 B parameters), 1024x1024 (4096 image tokens), 256 text tokens, bf16,
gradient checkpointing, for ``adamw_bf16`` (bf16 weights and states), ``adamw`` (fp32 master weights,
fp32 states) and an EMA on the CPU or the accelerator. Its own fake-against-real check uses a
~16 M-parameter Lumina 2 (``validation_full``; ``tests/test_memory_estimate.py`` runs it too). The
8-bit and 4-bit states are not in this repository yet, so their rows come from the data table
(``trainer_core.memory.estimate.OPTIMIZER_STATES``), printed after the measured modes.

Usage::

    python bench/estimate_vram.py                        # validation + both workloads, all modes (~4 min)
    python bench/estimate_vram.py --workload image --modes bf16 int8-quanto --skip-validation
    python bench/estimate_vram.py --out vram.json
    python bench/estimate_vram.py --workload lumina2-full     # Lumina 2 full fine-tune, 1024^2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see bench_overhead.py)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory as bm  # noqa: E402  (puts the repository root on sys.path)

from trainer_core.memory.quantize import is_quantized_tensor  # noqa: E402

GIB = 2**30
CPU = torch.device("cpu")
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
KINDS = ("weights", "dequantised", "lora", "grads", "optimizer", "ema", "activations", "inputs")

# The modes of bench_memory's GPU part, plus TREAD on the plain bf16 step.
MODES: dict[str, dict] = {
    "bf16": bm.GPU_MODES["bf16"],
    "bf16+tread": {"memory": {}, "tread": bm.TREAD_MIDDLE},
    "int8-quanto": bm.GPU_MODES["int8-quanto"],
    "int8+offload": bm.GPU_MODES["int8+offload"],
    "int8+offload+tread": bm.GPU_MODES["int8+offload+tread"],
}
# The published figures to compare with (GB of the card; a "24 GB" card holds about 24 GiB).
BARS: dict[tuple[str, str], tuple[float, str]] = {
    ("image", "bf16"): (24.0, "K5 image LoRA r16 fits a 24 GB card comfortably"),
    ("image", "bf16+tread"): (24.0, "K5 image LoRA r16 fits a 24 GB card comfortably"),
    ("image", "int8-quanto"): (24.0, "K5 image LoRA r16 fits a 24 GB card comfortably"),
    ("image", "int8+offload"): (16.0, "K5 image LoRA r16 fits 16 GB with offload + int8"),
    ("image", "int8+offload+tread"): (16.0, "K5 image LoRA r16 fits 16 GB with offload + int8"),
}
VIDEO_BAR = (13.0, "K5 Video Lite trains in about 13 GB")
VALIDATION_LATENT = (1, 32, 48)  # 384 visual tokens (16 x 24 patches: not square, so no axis mix-up hides)
VALIDATION_TEXT_TOKENS = 64
VALIDATION_MODES = ("bf16", "int8-quanto", "bf16+tread")


# --------------------------------------------------------------------------- the tracker
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive on ``device``, after every aten operation; their peak, by kind.

    A storage is registered the first time an operation returns a tensor on it (or by
    :meth:`register` for what existed before) and released by a weakref finaliser when its last
    tensor goes: the same lifetime the allocator sees. Views share their base's storage and count
    once; tensor subclasses (quanto's int8 weights) count their inner tensors. Each storage is
    rounded up to ``granularity`` bytes. New storages get the current :attr:`kind` (see
    :meth:`tagging`); ``paused`` skips host-side bookkeeping.
    """

    def __init__(self, device: torch.device = CPU, granularity: int = 1) -> None:
        super().__init__()
        self.device = device
        self.granularity = granularity
        self.live: dict[int, list] = {}  # storage key -> [bytes, kind]
        self._refs: dict[int, weakref.ref] = {}
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.kind = "activations"
        self.phase = "set-up"
        self.paused = False
        self.reset_peak()

    def reset_peak(self) -> None:
        self.peak = self.total
        self.peak_by_kind = dict(self.by_kind)
        self.peak_phase = self.phase
        self.kind_peaks = dict(self.by_kind)

    def _storages(self, t: torch.Tensor) -> Iterator[tuple[Any, torch.device]]:
        if is_traceable_wrapper_subclass(t):  # quanto: int8 data and scales
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    yield from self._storages(inner)
            return
        try:
            yield t.untyped_storage(), t.device
        except (RuntimeError, NotImplementedError):  # no storage (sparse, nested): nothing to count
            return

    def register(self, t: torch.Tensor, kind: str) -> None:
        for storage, device in self._storages(t):
            if device != self.device:
                continue
            key = storage._cdata
            if key in self.live:
                continue
            n = -(-storage.nbytes() // self.granularity) * self.granularity
            self.live[key] = [n, kind]
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._release(key))
            self.total += n
            self.by_kind[kind] += n
        self._update_peak()

    def retag(self, t: torch.Tensor, kind: str) -> None:
        """Move ``t``'s storages to ``kind`` (a gradient is born as an activation gradient)."""
        for storage, device in self._storages(t):
            entry = self.live.get(storage._cdata) if device == self.device else None
            if entry is not None and entry[1] != kind:
                self.by_kind[entry[1]] -= entry[0]
                self.by_kind[kind] += entry[0]
                entry[1] = kind

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None:
            self.total -= entry[0]
            self.by_kind[entry[1]] -= entry[0]

    def _update_peak(self) -> None:
        for kind, n in self.by_kind.items():
            if n > self.kind_peaks[kind]:
                self.kind_peaks[kind] = n
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_kind = dict(self.by_kind)
            self.peak_phase = self.phase

    @contextlib.contextmanager
    def tagging(self, kind: str) -> Iterator[None]:
        saved, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = saved

    @contextlib.contextmanager
    def pausing(self) -> Iterator[None]:
        saved, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = saved

    def _transient(self, n: int, kind: str) -> None:
        """A buffer a kernel allocates and frees inside itself, alive next to the op's inputs and output."""
        n = -(-n // self.granularity) * self.granularity
        self.total += n
        self.by_kind[kind] += n
        self._update_peak()
        self.total -= n
        self.by_kind[kind] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.register(t, self.kind)
            hidden = dequantised_bytes(func, types, args, kwargs)
            if hidden:
                self._transient(hidden, "dequantised")
        return out


_QUANTO_OWN_OPS = ("detach", "_to_copy", "to", "t")  # what quanto's WeightQBytesTensor handles without dequantising


def dequantised_bytes(func: Any, types: Any, args: tuple, kwargs: dict | None) -> int:
    """Bytes of the dequantised weight copies a quanto operation makes inside its kernel.

    A dispatch mode does not see inside a kernel, and two of quanto's make a full-size copy of an int8
    weight in the scale's dtype (bf16 here) and drop it before returning:

    - ``quanto::qbytes_mm`` with floating-point activations (the forward of every int8 linear):
      ``weights = output_scales * weights`` then a matmul. That is its CUDA path for bf16
      activations and its CPU path for fp32 (the CPU takes ``_weight_int8pack_mm`` for bf16, which
      makes no copy: this models the GPU);
    - any other aten op given a quanto weight (the backward's ``grad @ weight``) goes through
      ``qfallback``, which dequantises the weight first.

    Each such copy counts as a transient next to the op's inputs and output (kind ``dequantised``).
    Not modelled: on the CPU, ``float scale * int8 weight`` first casts the int8 weight to float in
    one more temporary (TensorIterator's input promotion; CUDA casts inside the kernel). That is
    the int8 row's gap to the allocator in the validation.
    """
    if func.namespace == "quanto" and func.__name__.startswith("qbytes_mm"):
        activations, weights, scales = args[:3]
        if activations.dtype.is_floating_point:
            return weights.numel() * scales.element_size()
        return 0
    if func.namespace != "aten" or func.overloadpacket.__name__ in _QUANTO_OWN_OPS:
        return 0
    if not any(t.__module__.startswith("optimum.quanto") for t in types):  # no quanto tensor among the arguments
        return 0
    total = 0
    for t in tree_flatten((args, kwargs or {}))[0]:
        scale = getattr(t, "_scale", None)
        if isinstance(t, torch.Tensor) and isinstance(scale, torch.Tensor) and is_quantized_tensor(t):
            total += t.numel() * scale.element_size()
    return total


# --------------------------------------------------------------------------- fake mode helpers
@contextlib.contextmanager
def fake_mode() -> Iterator[Any]:
    """A ``FakeTensorMode`` in which modules can still be cast and moved.

    ``Module._apply`` swaps fake parameters (``torch.utils.swap_tensors``), which refuses tensors
    that have weakrefs; the fake mode's tensor memo (a cache of real -> fake conversions, weak
    values) holds one to every fake tensor it made. The memo is cleared before each swap: it only
    deduplicates conversions, none of which is in progress then.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo = mode.fake_tensor_converter.meta_converter.tensor_memo
    plain_swap = torch.utils.swap_tensors

    def swap(t1: torch.Tensor, t2: torch.Tensor) -> None:
        memo.clear()
        plain_swap(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        with mode:
            yield mode
    finally:
        torch.utils.swap_tensors = plain_swap


@contextlib.contextmanager
def routing_on_host(tracker: LiveBytes) -> Iterator[None]:
    """TREAD's token choice on real tensors, untracked (it runs on the host in training too)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from trainer_core.routing import kandinsky5 as routing

    plain = routing.select, routing.generator_from_global_rng

    def on_host(fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily(), tracker.pausing():
                return fn(*args, **kwargs)

        return run

    routing.select, routing.generator_from_global_rng = on_host(plain[0]), on_host(plain[1])
    try:
        yield
    finally:
        routing.select, routing.generator_from_global_rng = plain


@contextlib.contextmanager
def no_zero_init_randomisation() -> Iterator[None]:
    """``randomize_zero_init`` reads values (``count_nonzero``), which fake tensors have not; shapes stay."""
    from trainer_core.testing import tiny

    plain = tiny.randomize_zero_init
    tiny.randomize_zero_init = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        tiny.randomize_zero_init = plain


# --------------------------------------------------------------------------- one case
def flow_step_loss(family: Any, tr: torch.nn.Module, x0: torch.Tensor, text: dict, g: torch.Generator, bf16: bool):
    """One training forward as the engine runs it: draw sigma and noise, predict, flow loss."""
    from trainer_core.train.flow import flow_loss

    sigma = torch.rand(1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noisy, weights = family.prepare_noisy(x0, noise, sigma)
    target = family.target(x0, noise)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with autocast:
        pred = family.predict(tr, noisy, sigma, text)
    return flow_loss(pred.float(), target.float(), "l2", weights=weights).mean()


def register_module(tracker: LiveBytes, module: torch.nn.Module) -> None:
    """Track every parameter and buffer of ``module``: trained ones as ``lora``, frozen as ``weights``."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is not None:
                    tracker.register(t, "lora" if t.requires_grad else "weights")


def run_case(
    *,
    workload: str,
    mode_name: str,
    dims: dict,
    latent: tuple[int, int, int],
    text_len: int,
    bf16: bool,
    fake: bool,
    steps: int = 2,
    granularity: int = 1,
    profile: bool = False,
) -> dict:
    """Build the model as ``bench_memory.gpu_child`` does and run ``steps`` training steps, tracked.

    Returns the last step's peak and its breakdown by kind, what was alive when that step began,
    and (``profile``, real runs only) the CPU allocator's own peak over the same step.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    from trainer_core.families import get_family_class
    from trainer_core.lora.adapters import add_lora, lora_config
    from trainer_core.memory import transformer as memory
    from trainer_core.memory.offload import GroupOffloader, inner_tensors
    from trainer_core.memory.report import module_bytes, parameter_counts
    from trainer_core.spec import TrainSpec
    from trainer_core.testing.tiny import build_kandinsky5_transformer_like_pretrained
    from trainer_core.train.optim import build_optimizer, clip_gradients

    wl, mode = bm.GPU_WORKLOADS[workload], MODES[mode_name]
    mem = dict(mode["memory"])
    offload = bool(mem.get("enable_group_offload"))
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": wl.family, "model_flavour": wl.flavour},
            "lora": {"lora_rank": 16, "lora_alpha": 16, "lora_target_preset": "attention"},
            "training": {
                "mixed_precision": "bf16" if bf16 else "no",
                "base_model_default_dtype": "bf16" if bf16 else "fp32",
                "gradient_checkpointing": True,
                "seed": 7,
            },
            "memory": mem,
            "routing": {"tread_config": mode["tread"]},
        }
    )
    family = get_family_class(wl.family)(spec)
    dtype = torch.bfloat16 if bf16 else torch.float32
    t0 = time.perf_counter()
    row: dict = {"workload": workload, "mode": mode_name, "fake": fake, "dtype": str(dtype).removeprefix("torch.")}
    with contextlib.ExitStack() as stack:
        fm = stack.enter_context(fake_mode()) if fake else None
        if fake:
            stack.enter_context(no_zero_init_randomisation())
        tr = build_kandinsky5_transformer_like_pretrained(dims, dtype=dtype, device=CPU)
        quant = memory.quantize_transformer(tr, spec, family, CPU)
        torch.manual_seed(spec.training.seed)
        params = add_lora(tr, lora_config(spec.lora, family.lora_target_modules()))
        offloader = None
        if offload:  # the trainer's offloader; "meta" plays the host, so offloaded weights cost nothing
            m = spec.memory
            offloader = GroupOffloader(
                tr,
                CPU,
                offload_type=m.group_offload_type,
                blocks_per_group=m.group_offload_blocks_per_group,
                use_stream=False,
                offload_device="meta",
            )
        tr.enable_gradient_checkpointing()
        tr.train()
        lr = float(spec.optimizer.learning_rate or family.defaults.learning_rate)
        opt = build_optimizer(params, spec.optimizer, lr, seed=spec.training.seed)
        row.update(
            quantized_modules=len(quant.quantized),
            transformer_bytes=module_bytes(tr),
            lora_bytes=sum(p.numel() * p.element_size() for p in params),
            **parameter_counts(tr),
        )

        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(1, *latent, 16, generator=g)
        with unset_fake_temporarily():  # a real tensor (a no-op outside the fake mode)
            lengths = torch.tensor([text_len])
        if fm is not None:  # a fake constant: predict groups the batch by caption length (tolist, nonzero)
            lengths = fm.fake_tensor_converter.from_real_tensor(fm, lengths, make_constant=True)
        text = {
            "prompt_embeds": torch.randn(1, text_len, dims["in_text_dim"], generator=g),
            "prompt_lengths": lengths,
            "pooled_prompt_embeds": torch.randn(1, dims["in_text_dim2"], generator=g),
        }

        def forward() -> torch.Tensor:
            return flow_step_loss(family, tr, x0, text, g, bf16)

        tracker = LiveBytes(CPU, granularity)
        register_module(tracker, tr)
        for t in (x0, text["prompt_embeds"], text["pooled_prompt_embeds"]):
            tracker.register(t, "inputs")
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "grads"))
        if offloader is not None:  # an onloaded weight is a weight, not an activation
            for group in offloader.groups:

                def onload(*, demand: bool, _plain: Callable = group.onload) -> None:
                    with tracker.tagging("weights"):
                        _plain(demand=demand)

                group.onload = onload
        stack.enter_context(routing_on_host(tracker))
        stack.enter_context(tracker)
        prof = None
        for step in range(steps):
            torch.manual_seed(1000 + step)  # as bench_memory: TREAD draws from the global generator
            last = step == steps - 1
            if last:
                tracker.phase = "between steps"
                tracker.reset_peak()
                row["resident_bytes"] = tracker.total
                row["resident_by_kind"] = dict(tracker.by_kind)
                if profile:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                    prof.__enter__()
            tracker.phase = "forward"
            loss = forward()
            tracker.phase = "backward"
            loss.backward()
            tracker.phase = "optimizer"
            with tracker.tagging("optimizer"):
                try:
                    clip_gradients(params, spec.optimizer)
                except DataDependentOutputException:  # its float(total_norm) at the end; the clipping has run
                    pass
                opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        if prof is not None:
            prof.__exit__(None, None, None)
            row["allocator_step_peak"] = allocator_peak(prof)
        row.update(
            peak_bytes=tracker.peak,
            peak_by_kind=tracker.peak_by_kind,
            peak_phase=tracker.peak_phase,
            kind_peaks=tracker.kind_peaks,
            end_bytes=tracker.total,
        )
        if offloader is not None:
            sizes = [
                (g.exclusive, sum(t.numel() * t.element_size() for s in g.slots for t in inner_tensors(s.stored)))
                for g in offloader.groups
            ]
            row["offload"] = {
                "groups": len(sizes),
                "block_groups": sum(1 for exclusive, _ in sizes if exclusive),
                "largest_block_group_bytes": max((n for exclusive, n in sizes if exclusive), default=0),
                "non_block_groups_bytes": sum(n for exclusive, n in sizes if not exclusive),
                "offloaded_bytes": sum(n for _, n in sizes),
            }
    row["seconds"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- Lumina 2 full fine-tune
# Lumina-Image-2.0's transformer/config.json (Alpha-VLLM/Lumina-Image-2.0): 2.6 B parameters.
LUMINA2_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "hidden_size": 2304,
    "num_layers": 26,
    "num_refiner_layers": 2,
    "num_attention_heads": 24,
    "num_kv_heads": 8,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "scaling_factor": 1.0,
    "axes_dim_rope": (32, 32, 32),
    "axes_lens": (300, 512, 512),
    "cap_feat_dim": 2304,
}
LUMINA2_LATENT = (16, 128, 128)  # 1024x1024 through the Flux VAE (8x): 64x64 patches = 4096 image tokens
LUMINA2_TEXT_TOKENS = 256  # the authors' training length, system prompt included (reference/lumina2_conventions.md)
# (optimizer, ema_device) of each full fine-tune mode; ema_device None: no EMA
FULL_MODES: dict[str, tuple[str, str | None]] = {
    "full-adamw_bf16": ("adamw_bf16", None),
    "full-adamw_bf16+ema_cpu": ("adamw_bf16", "cpu"),
    "full-adamw_bf16+ema_accelerator": ("adamw_bf16", "accelerator"),
    "full-adamw": ("adamw", None),
}
FULL_BAR = (16.0, "issue 16: Lumina 2 full fine-tune at 1024^2 in <= 16 GB")
LUMINA2_TINY_VALIDATION = {  # a ~30 M-parameter Lumina 2 for the fake-against-real check
    **LUMINA2_CONFIG,
    "hidden_size": 384,
    "num_layers": 4,
    "num_refiner_layers": 1,
    "num_attention_heads": 6,
    "num_kv_heads": 2,
    "multiple_of": 64,
    "axes_dim_rope": (16, 24, 24),
    "cap_feat_dim": 128,
}


def run_full_case(
    *,
    mode_name: str,
    dims: dict,
    latent: tuple[int, int, int],
    text_len: int,
    bf16: bool,
    fake: bool,
    steps: int = 2,
    granularity: int = 1,
    profile: bool = False,
) -> dict:
    """A Lumina 2 full fine-tune step (``model_type full``), tracked as :func:`run_case` tracks a LoRA step.

    The trainer's own pieces: ``build_full_finetune`` (bf16 weights with the optimizers of
    ``keeps_low_precision_weights``, fp32 master weights otherwise), gradient checkpointing,
    ``build_optimizer``, ``clip_gradients`` and the EMA (``build_ema`` with the mode's
    ``ema_device``). An accelerator EMA is counted (kind ``ema``); a CPU one lives on ``meta`` here
    (the host: not device memory) and is updated there, which is ``ema_cpu_only``; without it each
    tensor visits the device for its update, one at a time (at most two fp32 copies of the largest
    weight, reported as ``ema_shuttle_bytes``, not in the peak).
    """
    from diffusers import Lumina2Transformer2DModel
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    from trainer_core.families import get_family_class
    from trainer_core.memory.report import module_bytes, parameter_counts
    from trainer_core.spec import TrainSpec
    from trainer_core.train.ema import EMA
    from trainer_core.train.fullft import FullFinetune
    from trainer_core.train.lowmem_optim import keeps_low_precision_weights
    from trainer_core.train.optim import build_optimizer, clip_gradients

    optimizer, ema_device = FULL_MODES[mode_name]
    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": "lumina2", "model_type": "full"},
            "optimizer": {"optimizer": optimizer, "learning_rate": 1e-5, "max_grad_norm": 1.0},
            "training": {
                "mixed_precision": "bf16" if bf16 else "no",
                "base_model_default_dtype": "bf16" if bf16 else "fp32",
                "gradient_checkpointing": True,
                "seed": 7,
                "use_ema": ema_device is not None,
                "ema_device": ema_device or "cpu",
            },
        }
    )
    family = get_family_class("lumina2")(spec)
    dtype = torch.bfloat16 if bf16 else torch.float32
    t0 = time.perf_counter()
    row: dict = {"workload": "lumina2-full", "mode": mode_name, "fake": fake}
    row["dtype"] = str(dtype).removeprefix("torch.")
    with contextlib.ExitStack() as stack:
        fm = stack.enter_context(fake_mode()) if fake else None
        torch.manual_seed(0)
        tr = Lumina2Transformer2DModel(**dims).to(dtype)
        adapter = FullFinetune(tr, family, master_fp32=not keeps_low_precision_weights(optimizer))
        params = adapter.params
        tr.enable_gradient_checkpointing()
        tr.train()
        opt = build_optimizer(params, spec.optimizer, 1e-5, seed=spec.training.seed)
        ema = None
        if ema_device == "accelerator":
            ema = EMA(params, 0.999, CPU)
        elif ema_device == "cpu":
            ema = EMA(params, 0.999, "meta")  # the host stands aside: nothing on the device
        largest = max(p.numel() for p in params)
        row.update(
            transformer_bytes=module_bytes(tr),
            trained_bytes=sum(p.numel() * p.element_size() for p in params),
            ema_shuttle_bytes=2 * 4 * largest if ema_device == "cpu" else 0,
            **parameter_counts(tr),
        )
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(1, *latent, generator=g)
        with unset_fake_temporarily():
            mask = real_mask = torch.ones(1, text_len, dtype=torch.bool)
        embeds = torch.randn(1, text_len, dims["cap_feat_dim"], generator=g)
        text = {"prompt_embeds": embeds, "prompt_attention_mask": mask}

        def forward() -> torch.Tensor:
            return flow_step_loss(family, tr, x0, text, g, bf16)

        tracker = LiveBytes(CPU, granularity)
        register_module(tracker, tr)
        if ema is not None:
            for t in ema.shadow_params():
                tracker.register(t, "ema")
        for t in (x0, text["prompt_embeds"]):
            tracker.register(t, "inputs")
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "grads"))
        if fm is not None:
            stack.enter_context(rope_on_host(tr, real_mask, tracker))
        stack.enter_context(tracker)
        prof = None
        for step in range(steps):
            last = step == steps - 1
            if last:
                tracker.phase = "between steps"
                tracker.reset_peak()
                row["resident_bytes"] = tracker.total
                row["resident_by_kind"] = dict(tracker.by_kind)
                if profile:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                    prof.__enter__()
            tracker.phase = "forward"
            loss = forward()
            tracker.phase = "backward"
            loss.backward()
            tracker.phase = "optimizer"
            with tracker.tagging("optimizer"):
                try:
                    clip_gradients(params, spec.optimizer)
                except DataDependentOutputException:
                    pass
                opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                tracker.phase = "ema"
                with tracker.tagging("ema"):
                    ema.update(step)
            del loss
        if prof is not None:
            prof.__exit__(None, None, None)
            row["allocator_step_peak"] = allocator_peak(prof)
        row.update(
            peak_bytes=tracker.peak,
            peak_by_kind=tracker.peak_by_kind,
            peak_phase=tracker.peak_phase,
            kind_peaks=tracker.kind_peaks,
            end_bytes=tracker.total,
        )
    row["seconds"] = time.perf_counter() - t0
    return row


@contextlib.contextmanager
def rope_on_host(transformer: torch.nn.Module, mask: torch.Tensor, tracker: LiveBytes) -> Iterator[None]:
    """Lumina 2's RoPE embedder on real tensors: it reads the caption lengths (``mask.sum().tolist()``).

    It only needs the latent's shape and the mask, so it runs outside the fake mode on a zero-strided
    stand-in; its outputs (position tables, a few MB) are registered as inputs, as the real run
    counts them.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    rope = transformer.rope_embedder
    plain = rope.forward

    def on_host(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        with unset_fake_temporarily(), tracker.pausing():
            stand_in = torch.zeros(1).expand(*hidden_states.shape)
            out = plain(stand_in, mask)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                tracker.register(t, "inputs")
        return out

    rope.forward = on_host
    try:
        yield
    finally:
        rope.forward = plain


def full_formula(params: int, mode_name: str, load_bytes: int = 2, weight_bytes: int | None = None) -> dict:
    """The training state of ``params`` trained weights by the data table (trainer_core.memory.estimate).

    ``weight_bytes`` None: what ``build_full_finetune`` does (``adamw_bf16``, ``ao-*`` and ``optimi-*``
    keep the loaded dtype, the other optimizers get fp32 master weights).
    """
    from trainer_core.memory.estimate import full_finetune_weight_bytes, training_state

    optimizer, ema_device = FULL_MODES.get(mode_name, (mode_name, None))
    state = training_state(
        params,
        full_finetune_weight_bytes(optimizer, load_bytes) if weight_bytes is None else weight_bytes,
        optimizer,
        ema=ema_device is not None,
        ema_on_device=ema_device == "accelerator",
    )
    return {"optimizer": optimizer, **state.as_report()}


def allocator_peak(prof: Any) -> int:
    """Peak of the CPU allocator's running total over a profiled region: allocations minus frees, in order."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- validation and estimates
def validation(steps: int) -> list[dict]:
    """Fake against real on the CPU: a ~100 M-parameter K5 transformer, small latent, every validation mode."""
    from trainer_core.testing.tiny import kandinsky5_transformer_config

    dims = kandinsky5_transformer_config(**bm.K5_MEDIUM)
    cases = [(mode, False) for mode in VALIDATION_MODES] + [("bf16", True)]
    rows = []
    print(
        f"Validation: K5 {dims['model_dim']} wide, {dims['num_text_blocks']}+{dims['num_visual_blocks']} blocks, "
        f"latent 1x{'x'.join(map(str, VALIDATION_LATENT))}x16 ({VALIDATION_LATENT[1] * VALIDATION_LATENT[2] // 4} "
        f"visual tokens), {VALIDATION_TEXT_TOKENS} text tokens, LoRA r16, gradient checkpointing; peak of step {steps}",
        flush=True,
    )
    print(
        f"  {'mode':12s} {'dtype':9s} {'fake MiB':>9s} {'real MiB':>9s} {'fake/real':>9s} "
        f"{'allocator MiB':>13s} {'fake/alloc':>10s}  peak in",
        flush=True,
    )
    for mode, bf16 in cases:
        common = {
            "workload": "image",
            "mode_name": mode,
            "dims": dims,
            "latent": VALIDATION_LATENT,
            "text_len": VALIDATION_TEXT_TOKENS,
            "bf16": bf16,
            "steps": steps,
        }
        fake = run_case(fake=True, **common)
        real = run_case(fake=False, profile=True, **common)
        alloc = real["resident_bytes"] + real["allocator_step_peak"]
        row = {
            "mode": mode,
            "dtype": fake["dtype"],
            "parameters": fake["parameters"],
            "fake_peak_bytes": fake["peak_bytes"],
            "real_peak_bytes": real["peak_bytes"],
            "allocator_peak_bytes": alloc,
            "fake_over_real": fake["peak_bytes"] / real["peak_bytes"],
            "fake_over_allocator": fake["peak_bytes"] / alloc,
            "fake_peak_by_kind": fake["peak_by_kind"],
            "real_peak_by_kind": real["peak_by_kind"],
            "resident_bytes": real["resident_bytes"],
            "peak_phase": [fake["peak_phase"], real["peak_phase"]],
            "seconds": [fake["seconds"], real["seconds"]],
        }
        rows.append(row)
        print(
            f"  {mode:12s} {row['dtype']:9s} {fake['peak_bytes'] / 2**20:9.1f} {real['peak_bytes'] / 2**20:9.1f} "
            f"{row['fake_over_real']:9.4f} {alloc / 2**20:13.1f} {row['fake_over_allocator']:10.4f}  "
            f"{fake['peak_phase']} / {real['peak_phase']}",
            flush=True,
        )
    return rows


def estimate(workload: str, mode: str, steps: int) -> dict:
    wl = bm.GPU_WORKLOADS[workload]
    row = run_case(
        workload=workload,
        mode_name=mode,
        dims=bm.gpu_transformer_config(workload, dry_run=False),
        latent=wl.latent,
        text_len=bm.GPU_TEXT_TOKENS,
        bf16=True,
        fake=True,
        steps=steps,
        granularity=CUDA_BLOCK,
    )
    bar = BARS.get((workload, mode), VIDEO_BAR if workload == "video" else None)
    row["bar_gb"], row["bar"] = bar if bar else (None, None)
    k = row["peak_by_kind"]
    row["breakdown"] = {
        "weights": k["weights"] + k["dequantised"],
        "lora_grads_optimizer": k["lora"] + k["grads"] + k["optimizer"],
        "activations": k["activations"] + k["inputs"],
    }
    if "offload" in row:
        o = row["offload"]
        row["offload"]["structural_estimate_bytes"] = (
            row["resident_bytes"]
            + o["largest_block_group_bytes"]
            + o["non_block_groups_bytes"]
            + row["peak_by_kind"]["activations"]
            + row["peak_by_kind"]["grads"]
            + row["peak_by_kind"]["inputs"]
        )
    return row


def validation_full(steps: int) -> list[dict]:
    """Fake against real on the CPU for the full fine-tune step: a ~16 M-parameter Lumina 2, every full mode."""
    rows = []
    print(
        f"Validation (full fine-tune): Lumina 2 {LUMINA2_TINY_VALIDATION['hidden_size']} wide, "
        f"{LUMINA2_TINY_VALIDATION['num_layers']} layers, latent 16x32x32 (256 image tokens), 32 text tokens, fp32",
        flush=True,
    )
    for mode in FULL_MODES:
        common = {"mode_name": mode, "dims": LUMINA2_TINY_VALIDATION, "latent": (16, 32, 32), "text_len": 32}
        fake = run_full_case(fake=True, bf16=False, steps=steps, **common)
        real = run_full_case(fake=False, bf16=False, steps=steps, profile=True, **common)
        alloc = real["resident_bytes"] + real["allocator_step_peak"]
        row = {
            "mode": mode,
            "parameters": fake["parameters"],
            "fake_peak_bytes": fake["peak_bytes"],
            "real_peak_bytes": real["peak_bytes"],
            "allocator_peak_bytes": alloc,
            "fake_over_real": fake["peak_bytes"] / real["peak_bytes"],
            "fake_over_allocator": fake["peak_bytes"] / alloc,
            "peak_phase": [fake["peak_phase"], real["peak_phase"]],
        }
        rows.append(row)
        print(
            f"  {mode:34s} fake {fake['peak_bytes'] / 2**20:8.1f} MiB  real {real['peak_bytes'] / 2**20:8.1f} MiB  "
            f"allocator {alloc / 2**20:8.1f} MiB  fake/alloc {row['fake_over_allocator']:.4f}  {fake['peak_phase']}",
            flush=True,
        )
    return rows


def estimate_full(mode: str, steps: int) -> dict:
    """Lumina 2 (2.6 B) full fine-tune at 1024x1024, bf16, gradient checkpointing, batch 1, 256 text tokens."""
    row = run_full_case(
        mode_name=mode,
        dims=LUMINA2_CONFIG,
        latent=LUMINA2_LATENT,
        text_len=LUMINA2_TEXT_TOKENS,
        bf16=True,
        fake=True,
        steps=steps,
        granularity=CUDA_BLOCK,
    )
    row["bar_gb"], row["bar"] = FULL_BAR
    k = row["peak_by_kind"]
    row["breakdown"] = {
        "weights": k["weights"] + k["lora"],  # frozen (none) + trained weights
        "grads_optimizer_ema": k["grads"] + k["optimizer"] + k["ema"],
        "activations": k["activations"] + k["inputs"],
    }
    row["formula"] = full_formula(row["trainable_parameters"], mode)
    return row


def print_full(row: dict) -> None:
    b, k = row["breakdown"], row["peak_by_kind"]
    print(
        f"  {row['mode']:34s} {_g(row['peak_bytes'])} {_g(b['weights'])} {_g(k['grads'])} {_g(k['optimizer'])} "
        f"{_g(k['ema'])} {_g(b['activations'])} {_g(row['resident_bytes'])}  {row['peak_phase']:9s} "
        f"{row['seconds']:5.1f}",
        flush=True,
    )


def print_full_table(params: int, base: dict | None) -> list[dict]:
    """The training state by the data table, also for optimizers the fake run does not have (8-bit, 4-bit).

    With the measured ``full-adamw_bf16`` row (``base``), a peak for each bf16-weight optimizer is
    derived: that row's peak with its optimizer state swapped for the table's (and the EMA added
    when it is on the device). The fp32-master rows (``adamw``) are measured, not derived.
    """
    print(
        f"  training state by the table ({params / 1e9:.2f} B trained parameters, bf16 load; the trainer "
        "keeps bf16 weights with adamw_bf16, ao-* and optimi-*), GiB:"
    )
    derived = []
    for optimizer in ("adamw", "adamw_bf16", "optimi-adamw", "ao-adamw8bit", "ao-adamw4bit"):
        for ema in (None, "cpu", "accelerator"):
            name = f"{optimizer}{'+ema_' + ema if ema else ''}"
            FULL_MODES.setdefault(name, (optimizer, ema))
            f = full_formula(params, name)
            print(
                f"    {name:28s} weights {_g(f['trained_weight_bytes'])} grads {_g(f['gradient_bytes'])} "
                f"optimizer {_g(f['optimizer_state_bytes'])} EMA {_g(f['ema_bytes'])} "
                f"({'device' if ema == 'accelerator' else 'host' if ema else '-':6s}) -> device "
                f"{_g(f['training_state_device_bytes'])}",
                flush=True,
            )
            if base is not None and optimizer != "adamw":
                measured = base["peak_by_kind"]["optimizer"]
                ema_bytes = f["ema_bytes"] if ema == "accelerator" else 0
                peak = base["peak_bytes"] - measured + f["optimizer_state_bytes"] + ema_bytes
                derived.append({"mode": name, "derived_peak_bytes": peak, **f})
                print(f"    {'':28s} derived peak {_g(peak)} GiB (measured adamw_bf16 peak, state swapped)")
    return derived


def _g(n: int | None) -> str:
    return f"{n / GIB:6.2f}" if n is not None else "   n/a"


def print_estimate(row: dict) -> None:
    b = row["breakdown"]
    bar = f"{row['bar_gb']:.0f} GB: {row['bar']}" if row["bar_gb"] else ""
    print(
        f"  {row['mode']:20s} {_g(row['peak_bytes'])} {_g(b['weights'])} {_g(b['lora_grads_optimizer'])} "
        f"{_g(b['activations'])} {_g(row['resident_bytes'])}  {row['peak_phase']:9s} {row['seconds']:5.1f}  {bar}",
        flush=True,
    )
    if "offload" in row:
        o = row["offload"]
        print(
            f"  {'':20s} offload: {o['block_groups']} block groups (largest {o['largest_block_group_bytes'] / GIB:.2f} "
            f"GiB) + {o['groups'] - o['block_groups']} others ({o['non_block_groups_bytes'] / GIB:.2f} GiB), "
            f"{o['offloaded_bytes'] / GIB:.2f} GiB offloaded; structural estimate "
            f"{o['structural_estimate_bytes'] / GIB:.2f} GiB",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workloads = [*bm.GPU_WORKLOADS, "lumina2-full"]
    ap.add_argument("--workload", nargs="+", default=workloads, choices=workloads)
    ap.add_argument("--full-modes", nargs="+", default=list(FULL_MODES), choices=list(FULL_MODES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=2, help="steps per case; the last one's peak is reported")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the real validation runs)")
    ap.add_argument("--skip-validation", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write every number as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # diffusers' K5 attention feeds fp32 into a bf16 RMSNorm (the unfused path, on a GPU as well)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    from importlib.metadata import version

    t0 = time.perf_counter()
    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": version("diffusers"),
            "peft": version("peft"),
            "optimum-quanto": version("optimum-quanto"),
        },
        "method": "FakeTensorMode run of the training step; live storage bytes after every aten op (LiveBytes)",
        "settings": {
            "lora": "rank 16, alpha 16, preset 'attention', fp32",
            "precision": "bf16 weights (fp32 _keep_in_fp32_modules), bf16 autocast (CPU's, standing in for CUDA's)",
            "gradient_checkpointing": True,
            "batch": 1,
            "text_tokens": bm.GPU_TEXT_TOKENS,
            "optimizer": "adamw_bf16 (trainer default), clip 1.0",
            "tread": bm.TREAD_MIDDLE,
            "steps": args.steps,
            "rounding": f"each storage rounded up to {CUDA_BLOCK} bytes (CUDA caching allocator block)",
        },
        "left_out": [
            "CUDA context and kernels (~0.3-0.6 GB)",
            "caching allocator reserve and fragmentation (max_memory_reserved - max_memory_allocated)",
            "kernel workspaces that are not tensors (cuBLAS, flash / cuDNN attention scratch)",
            "attention backend differences (CPU flash attention stands in: out + logsumexp saved, like CUDA flash)",
            "CUDA autocast vs CPU autocast op lists",
        ],
        "validation": [],
        "estimates": [],
    }

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))

    if not args.skip_validation:
        if any(w in bm.GPU_WORKLOADS for w in args.workload):
            results["validation"] = validation(args.steps)
        if "lumina2-full" in args.workload:
            results["validation_full"] = validation_full(args.steps)
        save()
    print(
        "Estimates (GiB; peak = live tensor bytes at the step's peak, the counterpart of max_memory_allocated; "
        "CUDA context, allocator reserve and kernel workspaces NOT included)",
        flush=True,
    )
    for workload in args.workload:
        if workload == "lumina2-full":
            estimate_lumina2_full(args, results, save)
            continue
        wl = bm.GPU_WORKLOADS[workload]
        dims = bm.gpu_transformer_config(workload, dry_run=False)
        tokens = wl.latent[0] * wl.latent[1] * wl.latent[2] // 4
        print(
            f" {workload} {wl.pixels}: {wl.family} ({wl.flavour}), {dims['model_dim']} wide, "
            f"{dims['num_text_blocks']}+{dims['num_visual_blocks']} blocks, {tokens} visual tokens, "
            f"{bm.GPU_TEXT_TOKENS} text tokens",
            flush=True,
        )
        print(
            f"  {'mode':20s} {'peak':>6s} {'weight':>6s} {'LoRA+':>6s} {'activ':>6s} {'resid':>6s}  "
            f"{'peak in':9s} {'s':>5s}  published bar",
            flush=True,
        )
        for mode in args.modes:
            row = estimate(workload, mode, args.steps)
            results["estimates"].append(row)
            print_estimate(row)
            save()
    print(
        "  weight = frozen base weights on the device at the peak; LoRA+ = LoRA weights, grads and AdamW state "
        "(and the optimizer step's temporaries when the peak falls in it); activ = everything else alive at the "
        "peak (activations kept for backward, recomputed block, activation gradients, temporaries, inputs); "
        "resid = alive between steps",
        flush=True,
    )
    print(f"total {time.perf_counter() - t0:.0f} s; peak RSS {bm.peak_rss() / 2**20:.0f} MiB", flush=True)
    results["seconds"] = time.perf_counter() - t0
    results["peak_rss"] = bm.peak_rss()
    save()


def estimate_lumina2_full(args: argparse.Namespace, results: dict, save: Callable[[], None]) -> None:
    c = LUMINA2_CONFIG
    print(
        f" lumina2-full 1024x1024: Lumina-Image-2.0, {c['hidden_size']} wide, {c['num_refiner_layers']}+"
        f"{c['num_layers']} layers, {LUMINA2_LATENT[1] * LUMINA2_LATENT[2] // 4} image tokens, "
        f"{LUMINA2_TEXT_TOKENS} text tokens; model_type full, bf16, gradient checkpointing, batch 1, clip 1.0",
        flush=True,
    )
    print(
        f"  {'mode':34s} {'peak':>6s} {'weight':>6s} {'grads':>6s} {'optim':>6s} {'EMA':>6s} {'activ':>6s} "
        f"{'resid':>6s}  {'peak in':9s} {'s':>5s}   (bar: {FULL_BAR[0]:.0f} GB)",
        flush=True,
    )
    params, base = None, None
    for mode in args.full_modes:
        row = estimate_full(mode, args.steps)
        params = row["trainable_parameters"]
        base = row if mode == "full-adamw_bf16" else base
        results["estimates"].append(row)
        print_full(row)
        save()
    if params:
        results["full_table"] = print_full_table(params, base)
        save()


if __name__ == "__main__":
    main()
