"""The trained adapter, whatever its kind: one interface for PEFT LoRA/DoRA and LyCORIS.

The engine builds one with :func:`build_adapter` and then only uses this interface: the
trainable parameters (optimizer, EMA, clipping), a state dict (checkpoints, exact resume), a file
to start from (``init_lora``) and the files it exports. Each kind lives in its own module
(:mod:`.adapters` for PEFT, :mod:`.lycoris` for LyCORIS), so a new kind adds a module here rather
than branches in the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..spec import TrainSpec
    from .export import LoraFiles


class TrainedAdapter(Protocol):
    """What the engine needs of an adapter."""

    params: list[torch.nn.Parameter]

    @property
    def kind(self) -> str:
        """lora, dora, lokr, loha, locon or full."""

    @property
    def rank(self) -> int:
        """Rank (LyCORIS: linear_dim), for the files' metadata."""

    @property
    def alpha(self) -> float:
        """Alpha (LyCORIS: linear_alpha), for the files' metadata."""

    @property
    def target_modules(self) -> list[str]:
        """What the adapter targets, for the files' metadata."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's weights (checkpoints)."""

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Put a state dict from :meth:`state_dict` back; a mismatch is a ConfigError naming ``source``."""

    def load_file(self, path: str | Path) -> None:
        """Start from an exported file of the same adapter (``init_lora``)."""

    def metadata(self) -> dict[str, str]:
        """Adapter type and settings, for both files' metadata."""

    def save(self, folder: Path, name: str, metadata: Mapping[str, str]) -> LoraFiles:
        """Write the adapter's own file and the ComfyUI file into ``folder``."""

    def at_strength(self, multiplier: float) -> AbstractContextManager[None]:
        """Apply the adapter at ``multiplier`` inside the block (validation_lycoris_strength)."""


def prepare_transformer(spec: TrainSpec, family: ModelFamily, transformer: torch.nn.Module) -> None:
    """Change the module layout the adapter needs; runs before quantisation (Lumina 2 fuses qkv for LyCORIS)."""
    family.prepare_for_adapter(transformer)


def build_adapter(
    spec: TrainSpec, family: ModelFamily, transformer: torch.nn.Module, quantised: bool
) -> TrainedAdapter:
    """Freeze ``transformer`` and add the adapter ``spec.lora`` asks for (seeded by the caller).

    ``model_type: full`` trains the transformer's own weights instead (:mod:`..train.fullft`).
    """
    if spec.model.model_type == "full":
        from ..train.fullft import build_full_finetune

        return build_full_finetune(spec, family, transformer)
    if spec.lora.lora_type == "lycoris":
        from .lycoris import LycorisAdapter

        return LycorisAdapter(transformer, spec.lora, family.adapter_target_modules(), quantised, family.name)
    from .adapters import PeftAdapter

    return PeftAdapter(transformer, spec.lora, family.adapter_target_modules(), family.name)
