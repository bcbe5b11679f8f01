"""``enable_model_cpu_offload``: the transformer and the VAE take turns on the accelerator while validating.

SimpleTuner's flag applies diffusers' ``enable_model_cpu_offload`` to its validation pipeline: each
model waits in CPU memory until it is called, and an accelerate hook then moves it to the
accelerator and the model before it back to the CPU. Our validation pipelines are built from cached
embeddings (no text encoder), so two models are involved: the transformer (denoising) and the VAE
(decoding, and encoding the reference image of i2i / i2v). With the flag at most one of them is on
the accelerator at a time, so the VAE's weights and its decode activations (the peak of a video
decode) never come on top of the transformer's weights; the price is moving the transformer to the
CPU and back at every render. The flag changes nothing while training: the transformer stays where
it trains (and the validation VAE in CPU memory).

How, and where it differs from diffusers' offload:

* The hooks are accelerate hooks (``add_hook_to_module``, ``module._hf_hook``) like the ones
  ``cpu_offload_with_hook`` installs: they fire on ``forward`` and, through diffusers'
  ``apply_forward_hook``, on ``vae.encode`` / ``vae.decode``; pipelines find the device through
  their ``execution_device``, as with diffusers' offload.
* Whichever model runs sends the other one to the CPU. diffusers' chain (transformer, then VAE)
  only offloads the model before, so an i2i render, which encodes the reference first, would have
  both on the device.
* Who is on the device is tracked here rather than read off a parameter (as accelerate's
  ``CpuOffload`` does), so the tests can stand a CPU device in for the accelerator.
* Each render starts with the transformer on the device (:meth:`ValidationOffload.before_render`):
  the families read the device they put the embeddings on from the transformer's parameters.
* On exit every hook is removed (with the ``forward`` attribute accelerate leaves behind), the VAE
  is on the CPU and the transformer back on the training device. ``Module.to`` keeps every
  Parameter object (plain tensors by ``param.data = ...``, quanto / torchao tensor subclasses by
  ``torch.utils.swap_tensors``), so the optimizer's and the EMA's references to the LoRA weights stay
  valid and training continues exactly as before.

On a CPU training device there is nothing to offload: the flag is a no-op there (logged).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device
from accelerate.utils.memory import clear_device_cache

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


def offloads_on(device: torch.device) -> bool:
    """Whether ``device`` is an accelerator to offload from (the CPU is not)."""
    return device.type != "cpu"


class ValidationOffload:
    """The validation loop's handle: which of transformer and VAE is on the device (``active`` only)."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, device: torch.device, active: bool) -> None:
        self.modules = {"transformer": transformer, "vae": vae}
        self.device = device
        self.active = active
        self.resident: str | None = None

    def before_render(self) -> None:
        """Put the transformer on the device (the VAE off it), where a render expects it to start."""
        if self.active:
            self.onload("transformer")

    def onload(self, name: str) -> None:
        """``name`` onto the device, after the other model has left it."""
        if self.resident == name:
            return
        if self.resident is not None:
            self.modules[self.resident].to(CPU)
            clear_device_cache()
        self.modules[name].to(self.device)
        self.resident = name


class _TakeTurnsHook(ModelHook):
    """Before its model runs (``forward``, ``encode``, ``decode``): onload it, inputs to the device."""

    def __init__(self, offload: ValidationOffload, name: str) -> None:
        self.offload = offload
        self.name = name
        self.execution_device = offload.device  # what diffusers' pipelines read as their device

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.offload.onload(self.name)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)


@contextlib.contextmanager
def model_cpu_offload(
    transformer: torch.nn.Module, vae: torch.nn.Module, device: torch.device | str, enabled: bool
) -> Iterator[ValidationOffload]:
    """Place ``transformer`` and ``vae`` for validation renders on ``device``; see the module docstring.

    Expects the transformer on ``device`` and the VAE on the CPU, and leaves them so. Off (or on a
    CPU device, where it is a no-op): the VAE joins the transformer on ``device`` for the whole
    validation, as without the flag. On: they take turns, moved by accelerate hooks. Call
    ``before_render()`` on the yielded handle before each render.
    """
    device = torch.device(device)
    active = enabled and offloads_on(device)
    if enabled and not active:
        log.info("enable_model_cpu_offload: validation runs on the CPU, there is nothing to offload")
    if active:
        hooked = [type(m).__name__ for m in (transformer, vae) if any(hasattr(s, "_hf_hook") for s in m.modules())]
        if hooked:
            log.warning("enable_model_cpu_offload ignored: %s already carries accelerate hooks", ", ".join(hooked))
            active = False
    offload = ValidationOffload(transformer, vae, device, active)
    if not active:
        vae.to(device)
        try:
            yield offload
        finally:
            vae.to(CPU)
        return
    log.info("enable_model_cpu_offload: the transformer and the VAE take turns on %s while validating", device)
    own_forward = {name: "forward" in m.__dict__ for name, m in offload.modules.items()}
    try:
        vae.to(CPU)
        transformer.to(device)
        offload.resident = "transformer"
        for name, module in offload.modules.items():
            add_hook_to_module(module, _TakeTurnsHook(offload, name))
        yield offload
    finally:
        for name, module in offload.modules.items():
            remove_hook_from_module(module)
            if not own_forward[name]:  # accelerate leaves the original as an instance attribute
                module.__dict__.pop("forward", None)
        vae.to(CPU)
        clear_device_cache()
        transformer.to(device)
