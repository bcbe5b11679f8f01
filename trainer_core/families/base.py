"""The ModelFamily interface: everything that differs between model families, in one place.

The engine is family-agnostic. It asks the family how to load each component, how to turn
captions and pixels into the tensors that get cached, how to build the transformer's input from
cached tensors and a noise level, what the training target is, which modules LoRA targets, how
LoRA names map to ComfyUI's, and how to render validation samples.

Noise convention shared by the whole core: ``sigma`` in (0, 1) is the fraction of noise, and
``noisy = (1 - sigma) * x0 + sigma * noise``. Each family maps sigma to its transformer's own
timestep and target (Lumina 2: t = 1 - sigma, target x0 - noise; Kandinsky 5: t = 1000 sigma,
target noise - x0).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ModelLoadError, UnknownFlavourError
from ..spec import MemorySpec, TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flavour:
    """A named published checkpoint of a family."""

    name: str
    repo_id: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilyDefaults:
    """Defaults that depend on the family; used wherever the spec leaves a value unset."""

    learning_rate: float
    resolution: int
    resolution_type: str
    validation_guidance: float
    validation_resolution: str
    validation_negative_prompt: str
    train_shift: float
    auto_shift: bool
    tokenizer_max_length: int


@dataclass
class TextEncoding:
    """One caption's cached text tensors and whether the tokenizer had to cut it."""

    tensors: dict[str, torch.Tensor]
    truncated: bool = False


class ModelFamily(ABC):
    """One model family. Instances are bound to a resolved TrainSpec."""

    name: ClassVar[str]
    flavours: ClassVar[dict[str, Flavour]]
    default_flavour: ClassVar[str]
    defaults: ClassVar[FamilyDefaults]
    bucket_alignment: ClassVar[int]
    lora_presets: ClassVar[dict[str, list[str]]]
    default_lora_preset: ClassVar[str] = "attention"
    supports_full_finetune: ClassVar[bool] = False
    # model_type full: fnmatch patterns of transformer parameters that stay frozen (train/fullft.py)
    full_finetune_frozen: ClassVar[list[str]] = []
    supports_video: ClassVar[bool] = False
    supports_tread: ClassVar[bool] = False  # TREAD token routing (trainer_core/routing); opt-in per family
    # CREPA teachers (crepa_feature_source) this family can train with (trainer_core/routing/crepa.py); () = none
    crepa_teachers: ClassVar[tuple[str, ...]] = ()
    # Transformer modules kept in full precision when the base is quantised (base_model_precision):
    # module names (the module and its subtree) or shell patterns. Families list their embedders,
    # time/modulation layers and output projection: small, and where quantisation error hurts most.
    quantization_exclude: ClassVar[list[str]] = ["*norm*"]
    # The diffusers subfolders the family loads (``_from_pretrained``); checked to exist before any scan or load.
    weight_folders: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every family's ``load_vae`` applies the VAE memory options (tiling, slicing) to what it returns."""
        super().__init_subclass__(**kwargs)
        load_vae = cls.__dict__.get("load_vae")
        if load_vae is not None and not getattr(load_vae, "__isabstractmethod__", False):
            if not getattr(load_vae, "_applies_vae_options", False):
                cls.load_vae = _with_vae_options(load_vae)  # type: ignore[method-assign]

    def __init__(self, spec: TrainSpec) -> None:
        self.spec = spec
        self.flavour = self.get_flavour(spec.model.model_flavour)

    # ------------------------------------------------------------------ identity and spec
    @classmethod
    def get_flavour(cls, name: str | None) -> Flavour:
        key = name or cls.default_flavour
        if key not in cls.flavours:
            raise UnknownFlavourError(
                f"model_flavour {key!r} is not a {cls.name} flavour",
                f"use one of: {', '.join(cls.flavours)}",
            )
        return cls.flavours[key]

    @property
    def source(self) -> str:
        """Repo id or local folder the weights come from."""
        return self.spec.model.pretrained_model_name_or_path or self.flavour.repo_id

    def check_spec(self) -> list[str]:
        """Raise ConfigError for options this family cannot honour; return warnings."""
        return []

    def lora_target_modules(self) -> list[str]:
        explicit = self.spec.lora.peft_lora_target_modules
        if explicit:
            return list(explicit)
        preset = self.spec.lora.lora_target_preset or self.default_lora_preset
        if preset not in self.lora_presets:
            from ..errors import ConfigError

            raise ConfigError(
                f"lora_target_preset {preset!r} is not known for {self.name}",
                f"use one of: {', '.join(self.lora_presets)}",
            )
        return list(self.lora_presets[preset])

    def adapter_target_modules(self) -> list[str]:
        """The module-name suffixes the adapter targets, in the layout :meth:`prepare_for_adapter` leaves."""
        return self.lora_target_modules()

    def prepare_for_adapter(self, transformer: torch.nn.Module) -> None:
        """Change the transformer's module layout for the adapter being trained; runs before quantisation.

        Nothing by default. Lumina 2 fuses q/k/v for LyCORIS, so the adapter's delta is a delta of
        the fused weight ComfyUI holds.
        """
        return None

    def frame_rule(self, frames: int) -> int:
        """The largest frame count <= ``frames`` the model's VAE accepts (video families override)."""
        return frames

    # ------------------------------------------------------------------ loading
    def _from_pretrained(self, cls: type, subfolder: str, **kwargs: Any) -> Any:
        """Load one component from a local diffusers folder or a Hugging Face repo id."""
        source = self.source
        local = Path(source).expanduser()
        if local.exists() and not (local / "model_index.json").exists() and not (local / subfolder).exists():
            raise ModelLoadError(
                f"{local} is not a diffusers model folder (no model_index.json and no {subfolder}/ inside)",
                "point pretrained_model_name_or_path at the folder that holds model_index.json",
            )
        try:
            return cls.from_pretrained(
                str(local) if local.exists() else source,
                subfolder=subfolder,
                revision=self.spec.model.revision,
                **kwargs,
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"could not load {subfolder} of {self.name} from {source!r}: {e}",
                "check the repo id or local folder; offline, the model must already be in the Hugging Face cache",
            ) from e

    def component_identity(self, subfolder: str) -> str:
        """Content identity of one component's weights, for cache keys."""
        from ..io_utils import folder_identity

        local = Path(self.source).expanduser()
        if local.exists():
            return folder_identity(local / subfolder)
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                self.source, revision=self.spec.model.revision, allow_patterns=[f"{subfolder}/*"]
            )
        except Exception as e:  # network or cache miss: identify by name only
            return f"{self.source}@{self.spec.model.revision or 'main'}/{subfolder}:{type(e).__name__}"
        return folder_identity(Path(folder) / subfolder)

    @abstractmethod
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Any: ...

    @abstractmethod
    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    @abstractmethod
    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    @abstractmethod
    def load_scheduler(self) -> Any: ...

    def _static_shift_scheduler(self, shift: float) -> Any:
        """The repo's FlowMatchEulerDiscreteScheduler, set to sample with a static ``shift`` and no dynamic shift.

        Families pin the schedule their authors sample with, so validation previews do not depend
        on whatever ``scheduler/scheduler_config.json`` a repo or local folder holds. Every other
        setting of the repo's config is kept.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self._from_pretrained(FlowMatchEulerDiscreteScheduler, "scheduler")
        config = scheduler.config
        if config.get("shift") != shift or config.get("use_dynamic_shifting"):
            log.info(
                "validation sampling with the authors' shift %s (the repo's scheduler says shift=%s, dynamic=%s)",
                shift,
                config.get("shift"),
                config.get("use_dynamic_shifting"),
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift, use_dynamic_shifting=False)
        return scheduler

    def text_encoder_modules(self, encoders: Any) -> list[torch.nn.Module]:
        """The text encoder models inside what ``load_text_encoders`` returned, in SimpleTuner's order.

        The first is ``text_encoder_1_precision``'s, the second ``text_encoder_2_precision``'s. Works
        for a tuple/list or a dataclass of tokenizers and models; override for anything else.
        """
        if dataclasses.is_dataclass(encoders) and not isinstance(encoders, type):
            items = [getattr(encoders, f.name) for f in dataclasses.fields(encoders)]
        elif isinstance(encoders, (tuple, list)):
            items = list(encoders)
        else:
            items = [encoders]
        return [m for m in items if isinstance(m, torch.nn.Module)]

    # ------------------------------------------------------------------ text
    def format_prompt(self, text: str, role: str = "caption") -> str:
        """The exact string the text encoder sees for a caption (or a negative prompt)."""
        return text

    @abstractmethod
    def text_cache_identity(self) -> dict[str, Any]:
        """Everything besides the caption that changes the cached text tensors."""

    @abstractmethod
    def encode_text(self, encoders: Any, captions: list[str]) -> list[TextEncoding]: ...

    @abstractmethod
    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    # ------------------------------------------------------------------ latents
    @abstractmethod
    def latent_cache_identity(self) -> dict[str, Any]:
        """Everything besides the source file and crop that changes the cached latents."""

    @abstractmethod
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """(B, 3, H, W) in [-1, 1] -> per-sample cached tensors (scaled latent mean and std)."""

    def sample_latents(self, items: list[dict[str, torch.Tensor]], generator: torch.Generator) -> torch.Tensor:
        """Draw x0 ~ N(mean, std) from cached posteriors, stacked into a batch."""
        means = torch.stack([it["mean"] for it in items]).float()
        stds = torch.stack([it["std"] for it in items]).float()
        eps = torch.randn(means.shape, generator=generator, dtype=torch.float32)
        return means + stds * eps

    @abstractmethod
    def image_seq_len(self, x0: torch.Tensor) -> int:
        """Image tokens per sample (for resolution-dependent shift)."""

    # ------------------------------------------------------------------ training step
    @staticmethod
    def compute_dtype(transformer: torch.nn.Module) -> torch.dtype:
        """The transformer's dtype, looked up once.

        diffusers' ``ModelMixin.dtype`` walks every submodule on each call (about 1 ms a step on
        the tiny model, more on real ones), so it is cached on the module.
        """
        cached = transformer.__dict__.get("_tuner_compute_dtype")
        if cached is None:
            cached = transformer.dtype
            transformer.__dict__["_tuner_compute_dtype"] = cached
        return cached

    def prepare_noisy(
        self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformer's noisy input and an optional per-element loss weight.

        Default: ``(1 - sigma) * x0 + sigma * noise`` and no weighting. Image-to-video families
        override it to keep the conditioning frame clean and leave it out of the loss.
        """
        s = sigma.view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * noise, None

    @abstractmethod
    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor: ...

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    # ------------------------------------------------------------------ CREPA (families with crepa_teachers)
    # They also give ``forward_calls(text)`` (the batch indices of each transformer call ``predict``
    # makes) and ``token_grid(transformer, x0)`` (frames, rows, columns of image tokens).
    def crepa_hidden_size(self, transformer: torch.nn.Module) -> int:
        """The width of the blocks CREPA captures (its projector's input)."""
        raise NotImplementedError(f"CREPA is not available for {self.name}")

    def crepa_image_tokens(self, text: dict[str, torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
        """A call's image tokens from a captured block's output, ``select(output, batch indices)``.

        None (the default): the blocks hold image tokens only, in the ``token_grid`` order.
        """
        return None

    # ------------------------------------------------------------------ validation
    def prepare_validation(self, index: Any) -> None:
        """Called before validation renders with the dataset index (i2v picks its input frame)."""
        return None

    @property
    def uses_reference_images(self) -> bool:
        """True when training pairs need reference images (``conditioning_data``): image editing."""
        return False

    def validation_reference(self, index: Any, width: int, height: int) -> Any:
        """The reference image validation renders edit, as a Sample fitted to width x height; None if none.

        Image-editing families return one; it is shown to the text encoder with every validation
        prompt and passed to :meth:`render` as ``reference`` (a PIL image).
        """
        return None

    def validation_prompts_from_data(self, index: Any) -> dict[str, str]:
        """Validation prompts taken from the data (name -> prompt), rendered after the spec's own."""
        return {}

    @abstractmethod
    def render(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler: Any,
        prompt: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor],
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        guidance_rescale: float,
        seed: int,
    ) -> Any:
        """Render one validation image (PIL) with the training transformer."""

    def lora_metadata_extra(self) -> dict[str, str]:
        return {}


def apply_vae_options(vae: torch.nn.Module, memory: MemorySpec) -> torch.nn.Module:
    """``vae_enable_tiling`` / ``vae_enable_slicing``: diffusers' tiled and sliced VAE passes.

    Tiling splits large images into overlapping tiles (bounded memory at any resolution; tiled
    encodes differ very slightly at tile seams); slicing encodes and decodes a batch one image at a time.
    """
    for flag, method in (("vae_enable_tiling", "enable_tiling"), ("vae_enable_slicing", "enable_slicing")):
        if not getattr(memory, flag):
            continue
        fn = getattr(vae, method, None)
        try:
            if fn is None:
                raise NotImplementedError
            fn()
        except NotImplementedError:
            log.warning("%s is set, but %s has no %s(); ignored", flag, type(vae).__name__, method)
    return vae


def _with_vae_options(load_vae: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    @functools.wraps(load_vae)
    def wrapper(self: ModelFamily, *args: Any, **kwargs: Any) -> torch.nn.Module:
        return apply_vae_options(load_vae(self, *args, **kwargs), self.spec.memory)

    wrapper._applies_vae_options = True  # type: ignore[attr-defined]
    return wrapper
