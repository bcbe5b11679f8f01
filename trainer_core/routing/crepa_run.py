"""CREPA inside a training run: what the engine asks of it, kept out of the engine.

:mod:`.crepa` holds the regulariser itself (loss, projector, capture hooks, DINOv2 teacher, the
teacher-feature cache). This module wires them to a run: it builds the teacher for the run's spec
and datasets, builds the regulariser once the transformer is loaded, opens the block capture for
one micro-batch and turns a capture into the micro-batch's CREPA term. The engine holds one
:class:`CrepaRun` (or None when CREPA is off) and calls these four methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import crepa

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..spec import TrainSpec


class CrepaRun:
    """CREPA for one run: its teacher, its regulariser and the per-step log."""

    def __init__(self, spec: TrainSpec, family: ModelFamily, device: torch.device) -> None:
        self.spec, self.family, self.device = spec, family, device
        self.teacher: crepa.TeacherFeatures | None = None
        self.encoder: tuple[int, tuple[int, int]] | None = None  # DINOv2's width and token grid
        self.regulariser: crepa.CrepaRegulariser | None = None
        self.log: dict[str, float] = {}

    @property
    def c(self) -> Any:
        return self.spec.crepa

    def build_teacher(
        self,
        key: Callable[[Any], str],
        latents: Callable[[list[Any]], list[dict[str, torch.Tensor]]],
        vae_dtype: torch.dtype,
    ) -> bool:
        """The DINOv2 teacher's features, cached on disk beside the latents (``crepa_teacher_cache``).

        Returns whether they are cached, so the caller can run the pre-pass (:meth:`TeacherFeatures.ensure`)
        while no transformer is loaded. Without the cache the VAE and DINOv2 load at the first draw
        and stay loaded. The encoder's width comes from its config (no weights loaded). The
        ``backbone`` teacher is a block of the model itself: nothing to build.
        """
        c, s = self.c, self.spec
        if c.crepa_feature_source == "backbone":
            return False
        from ..cache.store import TensorStore
        from ..io_utils import stable_hash

        source = crepa.resolve_encoder(c.crepa_encoder)
        dim, patch = crepa.encoder_dim(source)
        self.encoder = (dim, (c.crepa_encoder_image_size // patch,) * 2)
        cached = c.crepa_teacher_cache and not s.memory.vae_cache_disable
        stores = {ds.id: TensorStore(s.vae_cache_dir(ds) / "crepa") for ds in s.training_datasets} if cached else None
        folder = Path(source)
        identity = {
            "encoder": source,
            "encoder_config": stable_hash((folder / "config.json").read_text()) if folder.is_dir() else None,
            "image_size": c.crepa_encoder_image_size,
            "teacher": "posterior mean decoded, frames at linspace(0, F-1, latent frames), patch tokens",
        }

        def load_vae() -> torch.nn.Module:
            vae = self.family.load_vae(self.device, vae_dtype)
            if c.crepa_drop_vae_encoder:  # this copy only decodes
                vae.encoder = None
                if hasattr(vae, "quant_conv"):
                    vae.quant_conv = None
            return vae

        def load_teacher() -> crepa.DinoTeacher:
            return crepa.DinoTeacher(source, c.crepa_encoder_image_size, self.device, c.crepa_encoder_frames_batch_size)

        self.teacher = crepa.TeacherFeatures(self.family, identity, key, latents, load_vae, load_teacher, stores)
        return stores is not None

    def build_regulariser(self, transformer: torch.nn.Module, total_steps: int) -> list[torch.nn.Parameter]:
        """Check the block indices against the loaded model and build the projector; returns its parameters."""
        c = self.c
        crepa.check_block_index(c.crepa_block_index, transformer)
        if c.crepa_feature_source == "backbone" and c.crepa_teacher_block_index is not None:
            crepa.check_block_index(c.crepa_teacher_block_index, transformer, "crepa_teacher_block_index")
        hidden = self.family.crepa_hidden_size(transformer)
        dim, grid = (hidden, None) if c.crepa_feature_source == "backbone" else self.encoder
        self.regulariser = crepa.CrepaRegulariser(c, hidden, dim, grid, total_steps).to(self.device)
        return list(self.regulariser.projector.parameters())

    def capture(self, transformer: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        """The hook on CREPA's block (and the backbone teacher's) for the forward calls of one micro-batch."""
        c = self.c
        teacher = None
        if c.crepa_feature_source == "backbone":  # SimpleTuner's default teacher block is the student's own
            teacher = c.crepa_block_index if c.crepa_teacher_block_index is None else c.crepa_teacher_block_index
        return crepa.Captures(transformer, c.crepa_block_index, teacher)

    def term(
        self,
        transformer: torch.nn.Module,
        step: int,
        samples: Any,
        x0: torch.Tensor,
        text: dict,
        capture: Any,
        accum: int,
    ) -> torch.Tensor | None:
        """The CREPA loss of one micro-batch (None when its scheduled weight is 0); logs averaged over the step."""
        frames, rows, cols = self.family.token_grid(transformer, x0)
        select = self.family.crepa_image_tokens(text)  # Lumina 2: drop the caption tokens
        hidden, teacher = capture.hidden(self.family.forward_calls(text), frames, rows * cols, select)
        if teacher is None:
            teacher = torch.stack(self.teacher.get(samples)).to(self.device)
        term, logged = self.regulariser.loss(hidden, (rows, cols), teacher, step)
        for k, v in logged.items():
            self.log[k] = self.log.get(k, 0.0) + v / accum
        return term
