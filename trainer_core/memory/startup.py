"""Start-up sequencing: the caching models come and go one at a time, and it is checked.

The engine fills the text cache, then the latent cache, then loads the transformer, and each
encoder is loaded only when something is missing. This module makes that order explicit:

* text encoders are loaded (on the CPU first when they are quantised via the CPU or group
  offloaded), quantised per ``text_encoder_{1,2}_precision`` and, with ``group_offload_text_encoder``,
  group offloaded;
* when the text cache is done, :meth:`Startup.release` proves through weak references that no
  encoder survived (a leaked reference would keep gigabytes on the GPU) before the VAE loads; the
  same happens to the VAE before the transformer loads;
* with ``offload_during_startup`` a survivor is moved to the CPU (not only reported) and every
  stage emits a ``memory`` event (stage, CUDA allocated/peak, RSS), so the sequencing is measurable.

In this engine text encoders and VAE are never loaded together whatever the flag says (SimpleTuner
keeps both loaded unless it is set); the flag adds enforcement and the per-stage report.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..families.base import ModelFamily
from ..spec import TrainSpec
from .check import use_stream
from .offload import GroupOffloader
from .quantize import NO_CHANGE, TEXT_ENCODER_EXCLUDE, quantize_for_device
from .report import memory_snapshot, module_bytes

CPU = torch.device("cpu")


class Startup:
    """Loads the caching models for the engine and releases them in order."""

    def __init__(
        self,
        family: ModelFamily,
        spec: TrainSpec,
        device: torch.device,
        emit: Callable[..., None],
        warn: Callable[[str], None],
    ) -> None:
        self.family = family
        self.spec = spec
        self.device = device
        self.emit = emit
        self.warn = warn
        self.strict = spec.memory.offload_during_startup
        self.stages: list[str] = []  # every stage in order, for tests and logs
        self._refs: dict[str, list[weakref.ref]] = {}

    # ------------------------------------------------------------------ identities
    def text_identity_extra(self) -> dict[str, str]:
        """Added to the text cache identity when a text encoder is quantised (its embeddings differ)."""
        m = self.spec.memory
        extra = {}
        for key in ("text_encoder_1_precision", "text_encoder_2_precision"):
            if getattr(m, key) != NO_CHANGE:
                extra[key] = getattr(m, key)
        return extra

    def latent_identity_extra(self) -> dict[str, bool]:
        """Added to the latent cache identity with ``vae_enable_tiling``: tiled encodes differ at tile seams.

        Slicing (one image at a time) gives the same latents, so it does not change the key.
        """
        return {"vae_tiling": True} if self.spec.memory.vae_enable_tiling else {}

    # ------------------------------------------------------------------ loading
    def _offload(self, module: torch.nn.Module) -> None:
        """Group offload ``module`` (the hooks keep the offloader; holding it here would keep the model alive)."""
        m = self.spec.memory
        GroupOffloader(
            module,
            self.device,
            offload_type=m.group_offload_type,
            blocks_per_group=m.group_offload_blocks_per_group,
            use_stream=use_stream(self.spec, self.device),
        )

    def load_text_encoders(self, dtype: torch.dtype) -> Any:
        m = self.spec.memory
        precisions = [m.text_encoder_1_precision, m.text_encoder_2_precision]
        offload = m.enable_group_offload and m.group_offload_text_encoder
        quantized = any(p != NO_CHANGE for p in precisions)
        on_cpu = offload or (quantized and m.quantize_via == "cpu")
        encoders = self.family.load_text_encoders(CPU if on_cpu else self.device, dtype)
        modules = self.family.text_encoder_modules(encoders)
        for i, precision in enumerate(precisions):
            key = f"text_encoder_{i + 1}_precision"
            if i >= len(modules):
                if precision != NO_CHANGE:
                    self.warn(f"{key} is set, but {self.family.name} has {len(modules)} text encoder(s): ignored")
                continue
            quantize_for_device(
                modules[i], precision, TEXT_ENCODER_EXCLUDE, self.device, m.quantize_via, key=key, move=not offload
            )
        for module in modules:
            if offload:
                self._offload(module)
            elif on_cpu:
                module.to(self.device)
        self._track("text_encoders", modules)
        return encoders

    def load_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        offload = self.spec.memory.enable_group_offload and self.spec.memory.group_offload_vae
        vae = self.family.load_vae(CPU if offload else self.device, dtype)
        if offload:
            self._offload(vae)
        self._track("vae", [vae])
        return vae

    # ------------------------------------------------------------------ release
    def _track(self, what: str, modules: list[torch.nn.Module]) -> None:
        self._refs[what] = [weakref.ref(m) for m in modules]
        self._stage(f"{what}_loaded", modules)

    def _stage(self, stage: str, modules: list[torch.nn.Module]) -> None:
        self.stages.append(stage)
        if self.strict:
            resident = sum(module_bytes(m, self.device) for m in modules)
            snapshot = memory_snapshot(self.device)
            self.emit("memory", stage=stage, device=str(self.device), resident_bytes=resident, **snapshot)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, what: str) -> None:
        """After ``what`` is done: collect it and check it is gone; survivors are reported (and, strict, evicted)."""
        if what not in self._refs:  # never loaded (the cache was complete)
            return
        refs = self._refs.pop(what)
        self.free()
        alive = [m for m in (r() for r in refs) if m is not None]
        if alive:
            names = ", ".join(type(m).__name__ for m in alive)
            if self.strict and self.device.type != "cpu":
                for m in alive:
                    m.to(CPU)
                self.free()
                self.warn(f"{names} still referenced after caching; moved to the CPU (offload_during_startup)")
            else:
                self.warn(f"{names} still referenced after caching: its memory is not freed")
        self._stage(f"{what}_released", alive)
