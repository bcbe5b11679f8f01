"""Kandinsky 5.0 Image Lite: the text-to-image and image-editing (i2i) family.

Everything Kandinsky 5 image and video share (prompt templates, Qwen2.5-VL + CLIP text encoding,
latent scaling, the flow convention, the prediction call) is in :mod:`.kandinsky5`; this module
holds only what is image-specific: the flavours and defaults, the Flux VAE, i2i reference pairs
and validation through diffusers' ``Kandinsky5T2IPipeline`` / ``Kandinsky5I2IPipeline``.

LoRA targets: "attention+ffn" by default (:attr:`Kandinsky5Base.default_lora_preset`): query, key,
value and output of self- and cross-attention and both feed-forward layers of every block, modulation
never. Evidence, the authors' own LoRA configs:

- their LoRA trainer kandinskylab/kandinsky-5-lora-train (read in a public copy, Zahed-Riyaz/Kandinsky-5
  @ ecf33f1): ``configs/trainer/lora_image.yaml`` (the T2I recipe, 6B image DiT) lists exactly
  ``self_attention.to_query/to_key/to_value/out_layer``, ``cross_attention.to_query/to_key/to_value/
  out_layer`` and ``feed_forward.in_layer/out_layer`` (r 32, alpha 32); ``lora_video.yaml`` lists the same;
- their camera-control LoRA config (ai-forever/Kandinsky-5,
  ``kandinsky_2.0B_t2v_i2v_..._scheduler5.0_batch4.yaml``) lists the same ten modules;
- SimpleTuner's default is q/k/v only, and its issue #2204 reports K5 LoRAs trained that way washing
  out, with the authors' wider set named as the fix.

The q/k/v-only set stays available as ``lora_target_preset: attention``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..spec import parse_resolution_list
from .base import FamilyDefaults, Flavour
from .kandinsky5 import I2I_TORCHVISION_HINT, Kandinsky5Base, fp32_timesteps, torchvision_available


class Kandinsky5ImageFamily(Kandinsky5Base):
    """Kandinsky 5.0 Image Lite (T2I and I2I), Flux VAE, 1024 px class."""

    name: ClassVar[str] = "kandinsky5-image"
    flavours: ClassVar[dict[str, Flavour]] = {
        "t2i-lite-sft": Flavour(
            "t2i-lite-sft",
            "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers",
            "text-to-image, SFT (best for styles and characters)",
            {"template": "image", "scale_factor": (1.0, 1.0, 1.0), "sampling_shift": 3.0, "i2i": False},
        ),
        "t2i-lite-pretrain": Flavour(
            "t2i-lite-pretrain",
            "kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
            "text-to-image, pretrain (for teaching new concepts)",
            {"template": "image", "scale_factor": (1.0, 1.0, 1.0), "sampling_shift": 3.0, "i2i": False},
        ),
        "i2i-lite-sft": Flavour(
            "i2i-lite-sft",
            "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers",
            "image editing, SFT",
            {"template": "image_edit", "scale_factor": (1.0, 1.0, 1.0), "sampling_shift": 3.0, "i2i": True},
        ),
        "i2i-lite-pretrain": Flavour(
            "i2i-lite-pretrain",
            "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
            "image editing, pretrain",
            {"template": "image_edit", "scale_factor": (1.0, 1.0, 1.0), "sampling_shift": 3.0, "i2i": True},
        ),
    }
    default_flavour: ClassVar[str] = "t2i-lite-sft"
    defaults: ClassVar[FamilyDefaults] = FamilyDefaults(
        learning_rate=1e-4,
        resolution=1024,
        resolution_type="pixel_area",
        validation_guidance=5.0,  # SimpleTuner's recommendation; above ~7 "fries" the image
        validation_resolution="1024x1024",
        validation_negative_prompt="",  # the authors' negative_caption default
        # SimpleTuner's quick-start default; the model samples with 3.0 (load_scheduler).
        train_shift=1.0,
        auto_shift=False,
        tokenizer_max_length=256,
    )
    # The DiT patches 2x2 latents of an 8x VAE, so 16 px is all the model needs. SimpleTuner
    # defaults to 64; 16 crops at most 15 px per side instead of 63, and 64 (or the authors'
    # 128-multiple buckets) stays available through aspect_bucket_alignment.
    bucket_alignment: ClassVar[int] = 16

    @property
    def is_i2i(self) -> bool:
        return bool(self.flavour.options["i2i"])

    @property
    def uses_reference_images(self) -> bool:
        return self.is_i2i

    def check_spec(self) -> list[str]:
        warnings = super().check_spec()
        if self.is_i2i:
            warnings += self._check_i2i_spec()
        elif self.spec.validation.validation_using_datasets or self.spec.validation.eval_dataset_id:
            warnings.append(
                f"validation_using_datasets / eval_dataset_id only apply to i2i; {self.flavour.name!r} ignores them"
            )
        for w, h in parse_resolution_list(self.spec.validation.validation_resolution or "1024x1024"):
            if w % 16 or h % 16:
                raise ConfigError(
                    f"validation_resolution {w}x{h}: Kandinsky 5 needs sides that are multiples of 16 px",
                    "e.g. 1024x1024, 1152x896 or 1280x768",
                )
        return warnings

    def _check_i2i_spec(self) -> list[str]:
        """Pairs for every training dataset, a usable eval dataset, and torchvision, before anything loads."""
        s = self.spec
        problems = []
        unpaired = [ds.id for ds in s.training_datasets if not ds.conditioning_data]
        if unpaired:
            problems.append(
                f"dataset(s) {', '.join(unpaired)} have no conditioning_data: {self.flavour.name!r} edits a reference "
                "image, so each training image needs one (an image dataset's conditioning_data names a "
                "dataset_type 'conditioning' dataset whose images have the same file names)"
            )
        v = s.validation
        kinds = {d.id: d for d in s.datasets}
        if v.eval_dataset_id:
            ds = kinds.get(v.eval_dataset_id)
            if ds is None or ds.dataset_type not in ("image", "conditioning"):
                problems.append(
                    f"eval_dataset_id {v.eval_dataset_id!r} is not an image or conditioning dataset of this config"
                )
            elif ds.dataset_type == "image" and not ds.conditioning_data:
                problems.append(f"eval_dataset_id {v.eval_dataset_id!r} has no conditioning_data (no references)")
        if problems:
            raise ConfigError("; ".join(problems), "see the dataloader config examples in the Kandinsky 5 help")
        if not torchvision_available():
            raise ConfigError(
                f"model_flavour {self.flavour.name!r} needs torchvision, which is missing or does not import",
                I2I_TORCHVISION_HINT,
            )
        return []

    # ------------------------------------------------------------------ i2i validation
    def _eval_pairs(self, index: Any) -> list[Any]:
        """Training samples whose references validation may use: the eval dataset's, else every one."""
        eval_id = self.spec.validation.eval_dataset_id
        samples = [smp for smp in index.samples if smp.reference is not None]
        if eval_id:
            chosen = [smp for smp in samples if smp.dataset_id == eval_id]
            if chosen:
                return chosen
        return samples

    def _eval_reference_path(self, index: Any) -> tuple[Path, str]:
        """(image file, dataset id) of the reference validation edits."""
        from ..data.images import IMAGE_EXTENSIONS
        from ..data.listing import list_files

        eval_id = self.spec.validation.eval_dataset_id
        ds = next((d for d in self.spec.datasets if d.id == eval_id), None)
        if ds is not None and ds.dataset_type == "conditioning":
            files = list_files(Path(ds.instance_data_dir or "").expanduser(), IMAGE_EXTENSIONS)
            if not files:
                raise ConfigError(f"eval dataset {ds.id!r} holds no images", "point it at a folder of reference images")
            return files[0], ds.id
        pairs = self._eval_pairs(index)
        if not pairs:
            raise ConfigError("no reference image to validate the i2i model with", "add a conditioning dataset")
        return pairs[0].reference.path, pairs[0].dataset_id

    def validation_reference(self, index: Any, width: int, height: int) -> Any:
        if not self.is_i2i:
            return None
        from ..data.images import ImageProblem
        from ..data.references import probe_reference

        path, ds_id = self._eval_reference_path(index)
        try:
            return probe_reference(path, (width, height), ds_id)
        except ImageProblem as e:
            raise ConfigError(f"validation reference: {e}", "replace or remove the file") from None

    def validation_prompts_from_data(self, index: Any) -> dict[str, str]:
        """i2i with ``validation_using_datasets``: the edit caption of the pair whose reference is rendered."""
        if not (self.is_i2i and self.spec.validation.validation_using_datasets):
            return {}
        path, _ = self._eval_reference_path(index)
        for smp in self._eval_pairs(index):
            if smp.reference.path == path and smp.captions:
                return {f"dataset-{smp.path.stem}": smp.captions[0]}
        return {}

    def _check_transformer(self, transformer: torch.nn.Module) -> None:
        if transformer.config.visual_cond and not self.is_i2i:
            raise ConfigError(
                f"{self.source} holds an image-editing (i2i) transformer, but model_flavour is {self.flavour.name!r}",
                "point pretrained_model_name_or_path at a T2I model, or choose an i2i flavour",
            )

    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        vae = self._from_pretrained(AutoencoderKL, "vae", torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)
        return vae

    @torch.no_grad()
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
        reference: Any = None,
    ) -> Any:
        """Render through diffusers' Kandinsky5T2IPipeline (Kandinsky5I2IPipeline for i2i) with our cached embeddings.

        The pipeline snaps (width, height) to its 1 MP bucket list unless the size is listed, so the
        list is set to exactly the requested size. CFG runs prompt and negative in separate passes,
        so neither is padded. The timestep reaches the transformer in fp32 (:func:`fp32_timesteps`; the
        pipeline casts it to the transformer's dtype). ``guidance_rescale`` is not supported by the
        pipeline and is ignored.
        i2i: ``reference`` is the PIL image to edit, already fitted to (width, height); the pipeline
        encodes it with ``z * scaling_factor`` (no shift), as we train.
        """
        from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

        if self.is_i2i and reference is None:
            raise ConfigError("Kandinsky 5 i2i validation needs a reference image")
        pipeline_cls = Kandinsky5I2IPipeline if self.is_i2i else Kandinsky5T2IPipeline
        pipe = pipeline_cls(
            transformer=transformer,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            scheduler=scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.resolutions = [(width, height)]
        device = next(transformer.parameters()).device
        dtype = transformer.dtype
        kwargs = {}
        for prefix, text in (("", prompt), ("negative_", negative)):
            n = int(text["prompt_lengths"][0])
            kwargs[f"{prefix}prompt_embeds_qwen"] = text["prompt_embeds"][:1, :n].to(device, dtype)
            kwargs[f"{prefix}prompt_embeds_clip"] = text["pooled_prompt_embeds"][:1].to(device, dtype)
            kwargs[f"{prefix}prompt_cu_seqlens"] = torch.tensor([0, n], dtype=torch.int32, device=device)
        if self.is_i2i:
            kwargs["image"] = reference
        with fp32_timesteps(transformer, pipe.scheduler):
            result = pipe(
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
                **kwargs,
            )
        return result.image[0]
