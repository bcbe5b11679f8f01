"""Kandinsky 5 video (T2V and I2V; Lite and Pro), on the shared :class:`Kandinsky5Base`.

Conventions (../shared/reference/kandinsky5_conventions.md §5-6, checked against the authors' code;
where diffusers, ComfyUI, musubi or SimpleTuner differ we follow the authors):

- text: the authors' "video" template (crop 129, spelled "promt" / "scren") for T2V and I2V alike,
  Qwen last hidden state, at most 256 tokens after the crop; CLIP-L pooled. All in the base class.
- latents: HunyuanVideo VAE, ``z * 0.476986`` and no shift, 4x causal in time and 8x in space, so a
  clip of F = 4k+1 frames gives (F-1)/4+1 latent frames, stored channels-last ``(F', H/8, W/8, 16)``
  as posterior mean and std. Image datasets are allowed for T2V: an image is a one-frame clip (the
  causal VAE encodes frame 0 on its own), as the authors also train their video models on images.
- time: ``1000 * sigma`` in fp32, target ``noise - x0`` (base). RoPE ``scale_factor`` follows the
  authors' config of each flavour: (1, 2, 2) for Lite and Pro SD, (1, 3.16, 3.16) for Pro HD. diffusers
  picks by size instead ((1, 2, 2) only when 480 <= h, w <= 854), ComfyUI by model and area; where
  diffusers would pick differently for a training or validation size, ``check_spec`` warns.
- visual condition: every published K5 video checkpoint, T2V included, has ``visual_cond`` (33 input
  channels). T2V: ``[noisy | zeros | mask 0]``. I2V, the authors' way (diffusers >= 0.40 and ComfyUI
  agree): ``[noisy with latent frame 0 replaced by the clean image latent | zeros | mask 1 on frame 0]``,
  and frame 0 is left out of the loss (the sampler puts it back after every step, so its prediction
  is never used). musubi and SimpleTuner instead leave frame 0 noisy and put the image in the
  condition channels, which the sampler leaves at zero: such a LoRA ignores the image at inference.
- I2V condition latent: the sampler encodes the input image *alone*; the VAE's GroupNorms see the
  whole clip, so latent frame 0 of a clip is not the same tensor. The latent cache therefore also
  stores frame 0 encoded on its own, and :meth:`sample_latents` puts a draw of it in frame 0, so the
  model is trained on exactly the kind of condition it gets at inference.
- sampling: shift 10 (authors, ComfyUI), CFG 5, the authors' video negative prompt, frames >= 17
  (diffusers' I2V ``normalize_first_frame`` gives NaN for 5-13 frames).

Training defaults and why: learning rate 1e-4 (the authors' own LoRA config, ai-forever/Kandinsky-5
``kandinsky_2.0B_t2v_i2v_..._lr0.0001_..._scheduler5.0.yaml``; SimpleTuner's example uses 6e-5 with
``max_grad_norm 0.1``), training shift 5.0 (the same config's ``scheduler_scale`` and musubi's
recipe; SimpleTuner's default is 3.0; ``flow_schedule_shift`` overrides it), LoRA preset
"attention+ffn" (the target set of that config and of the official trainer; SimpleTuner issue #2204
reports the q/k/v-only default training poorly on Pro), resolution 512 ``pixel_area`` (the authors'
SD training size; SimpleTuner's example uses 480), validation 768x512, 61 frames at 24 fps.

No automatic shift. ``flow_schedule_auto_shift`` is refused (:meth:`Kandinsky5VideoFamily.check_spec`)
because no resolution rule for video exists to follow, and the image rule is wrong here:

- SimpleTuner (and this trainer until issue 14) feed ``frames x patches`` into the image line
  ``mu = 0.5 + 0.65 (n - 256) / 3840`` (diffusers' ``calculate_shift``, made for 256-4096 image tokens)
  and extrapolate: 24,576 tokens at 512x768x61 give shift ~101 (median sigma 0.99), 47,616 at 121
  frames ~5,000. The model then trains on almost pure noise.
- The authors' LoRA trainer (kandinskylab/kandinsky-5-lora-train, ``train/lora_train.py``, read in a
  public copy at Zahed-Riyaz/Kandinsky-5 @ ecf33f1) draws ``t = sigmoid(N(0, 1))`` and applies one static
  ``scheduler_scale``: 5.0 for video (``configs/trainer/lora_video.yaml``; also their camera-LoRA config
  in ai-forever/Kandinsky-5), 3.0 for images, whatever the size or length.
- They sample with static shifts too, and not by token count: 10 for the 512 px Lite/Pro SD configs,
  5 for the 1024 px Pro HD I2V config (four times the tokens, half the shift; kandinskylab/kandinsky-5
  ``configs/*.yaml``, ``generation_utils.py``). diffusers' K5 video pipelines use a static-shift
  scheduler (no ``mu``); musubi trains with a static 5.0.
- Per-frame tokens in the image line would give shift 2.05 at 512x768 (median sigma 0.67), far below
  the authors' 5.0 (median 0.83), with nothing to back it.

So the static default (5.0, the authors' video ``scheduler_scale``) is used unless
``flow_schedule_shift`` says otherwise; ``tests/test_kandinsky5_video.py`` pins 5.0 and the median
noise level at 512x768x61.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..data.video import largest_4k_plus_1
from ..errors import ConfigError
from ..spec import parse_resolution_list
from .base import FamilyDefaults, Flavour
from .kandinsky5 import Kandinsky5Base, _channels_last, fp32_timesteps

if TYPE_CHECKING:
    from PIL import Image

    from ..data.types import DatasetIndex
    from ..media import RenderedVideo
    from ..spec import TrainSpec

log = logging.getLogger(__name__)

SAMPLING_SHIFT = 10.0
DEFAULT_VALIDATION_FRAMES = 61
"""Validation clip length when ``validation_num_video_frames`` is unset: 2.5 s at 24 fps, 16 latent
frames. The authors' "5 s" is 121 frames (SimpleTuner's default); 61 costs about a third of the
attention and still shows motion."""
MIN_VALIDATION_FRAMES = 17
DEFAULT_FRAMERATE = 24.0
NEGATIVE_VIDEO = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards"
)  # the authors' default negative caption for T2V and I2V (also diffusers' and ComfyUI's)
LITE_SD = (1.0, 2.0, 2.0)
PRO_HD = (1.0, 3.16, 3.16)
NABLA_ALIGNMENT = 128  # NABLA sparse attention works on 8x8-patch tiles: pixel sides in multiples of 128


def _flavour(name: str, repo: str, description: str, *, scale: tuple[float, ...], i2v: bool, nabla: bool) -> Flavour:
    options = {"template": "video", "scale_factor": scale, "sampling_shift": SAMPLING_SHIFT, "i2v": i2v, "nabla": nabla}
    return Flavour(name, f"kandinskylab/{repo}", description, options)


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        _flavour("t2v-lite-sft-5s", "Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", "text-to-video Lite (2B), SFT, 5 s",
                 scale=LITE_SD, i2v=False, nabla=False),
        _flavour("t2v-lite-pretrain-5s", "Kandinsky-5.0-T2V-Lite-pretrain-5s-Diffusers",
                 "text-to-video Lite, pretrain (new concepts), 5 s", scale=LITE_SD, i2v=False, nabla=False),
        _flavour("t2v-lite-sft-10s", "Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers", "text-to-video Lite, SFT, 10 s",
                 scale=LITE_SD, i2v=False, nabla=True),
        _flavour("t2v-lite-pretrain-10s", "Kandinsky-5.0-T2V-Lite-pretrain-10s-Diffusers",
                 "text-to-video Lite, pretrain, 10 s", scale=LITE_SD, i2v=False, nabla=True),
        _flavour("t2v-pro-sft-5s-hd", "Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers", "text-to-video Pro (19B), SFT, 5 s, HD",
                 scale=PRO_HD, i2v=False, nabla=True),
        _flavour("t2v-pro-sft-10s-hd", "Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers", "text-to-video Pro, SFT, 10 s, HD",
                 scale=PRO_HD, i2v=False, nabla=True),
        _flavour("t2v-pro-pretrain-5s-hd", "Kandinsky-5.0-T2V-Pro-pretrain-5s-Diffusers",
                 "text-to-video Pro, pretrain, 5 s, HD", scale=PRO_HD, i2v=False, nabla=True),
        _flavour("t2v-pro-pretrain-10s-hd", "Kandinsky-5.0-T2V-Pro-pretrain-10s-Diffusers",
                 "text-to-video Pro, pretrain, 10 s, HD", scale=PRO_HD, i2v=False, nabla=True),
        _flavour("i2v-lite-5s", "Kandinsky-5.0-I2V-Lite-5s-Diffusers", "image-to-video Lite, 5 s",
                 scale=LITE_SD, i2v=True, nabla=False),
        # The authors run these weights with their SD config (512 px, (1, 2, 2), shift 10) and their HD
        # config (1024 px, (1, 3.16, 3.16), shift 5); the flavour name has no "hd", so SD it is.
        _flavour("i2v-pro-sft-5s", "Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers", "image-to-video Pro, SFT, 5 s (SD)",
                 scale=LITE_SD, i2v=True, nabla=False),
    )
}  # fmt: skip


def diffusers_scale_factor(width: int, height: int) -> tuple[float, float, float]:
    """The RoPE scale diffusers' K5 video pipelines pick for a size (``_get_scale_factor``)."""
    return LITE_SD if 480 <= height <= 854 and 480 <= width <= 854 else PRO_HD


def nearest_4k_plus_1(n: int) -> tuple[int, ...]:
    """The valid frame counts nearest to ``n``: (n,) if it is valid, else the one below and the one above."""
    below = largest_4k_plus_1(n)
    return (n,) if below == n else tuple(v for v in (below, below + 4) if v >= 1)


class Kandinsky5VideoFamily(Kandinsky5Base):
    """Kandinsky 5.0 Video Lite and Pro, T2V and I2V, HunyuanVideo VAE."""

    name: ClassVar[str] = "kandinsky5-video"
    flavours: ClassVar[dict[str, Flavour]] = FLAVOURS
    default_flavour: ClassVar[str] = "t2v-lite-sft-5s"
    supports_video: ClassVar[bool] = True
    crepa_teachers: ClassVar[tuple[str, ...]] = ("encoder", "backbone")  # DINOv2 needs decode_for_crepa
    defaults: ClassVar[FamilyDefaults] = FamilyDefaults(
        learning_rate=1e-4,
        resolution=512,
        resolution_type="pixel_area",
        validation_guidance=5.0,
        validation_resolution="768x512",  # width x height: the authors' 512x768 (h x w) default
        validation_negative_prompt=NEGATIVE_VIDEO,
        train_shift=5.0,
        auto_shift=False,
        tokenizer_max_length=256,
    )
    bucket_alignment: ClassVar[int] = 16  # training attends densely (no NABLA), so 2x2 patches of 8x latents

    def __init__(self, spec: TrainSpec) -> None:
        super().__init__(spec)
        self.validation_image: Image.Image | None = None  # I2V condition; see prepare_validation

    # ------------------------------------------------------------------ spec
    @property
    def is_i2v(self) -> bool:
        return bool(self.flavour.options["i2v"])

    @property
    def validation_frames(self) -> int:
        return self.spec.validation.validation_num_video_frames or DEFAULT_VALIDATION_FRAMES

    @property
    def framerate(self) -> float:
        return float(self.spec.validation.framerate or DEFAULT_FRAMERATE)

    def frame_rule(self, frames: int) -> int:
        """4k+1 (HunyuanVideo's causal 4x time compression); I2V needs a frame after the condition, so >= 5."""
        n = largest_4k_plus_1(frames)
        return n if n >= (5 if self.is_i2v else 1) else 0

    def check_spec(self) -> list[str]:
        warnings = super().check_spec()
        self._check_shift()
        problems = self._frame_problems() + self._dataset_problems() + self._validation_problems()
        if problems:
            raise ConfigError("; ".join(problems), "fix the options named above; every problem is listed")
        return warnings + self._scale_warnings() + self._eval_dataset_warnings()

    def _check_shift(self) -> None:
        """Refuse ``flow_schedule_auto_shift``: there is no principled automatic shift for video (module doc)."""
        if self.spec.training.flow_schedule_auto_shift:
            raise ConfigError(
                "flow_schedule_auto_shift is not supported for Kandinsky 5 video: the image rule counts every "
                "frame's tokens and gives a shift of about 100 at 512x768x61 (median noise level 0.99), and the "
                f"authors train their video LoRAs with a static shift of {self.defaults.train_shift:g} at every size",
                f"remove flow_schedule_auto_shift to train with the default static shift {self.defaults.train_shift:g} "
                "(the authors' scheduler_scale), or set flow_schedule_shift to the shift you want",
            )

    def _frame_problems(self) -> list[str]:
        out = []
        for ds in self.spec.video_datasets:
            n = ds.video.num_frames if ds.video else None
            if n is not None and largest_4k_plus_1(n) != n:
                out.append(
                    f"dataset {ds.id!r}: video.num_frames {n} is not 4k+1 (the VAE compresses time 4x "
                    f"causally); nearest valid: {' or '.join(map(str, nearest_4k_plus_1(n)))}"
                )
            if self.is_i2v and n is not None and n < 5:
                out.append(
                    f"dataset {ds.id!r}: video.num_frames {n} leaves I2V nothing to predict after frame 0; use >= 5"
                )
        n = self.spec.validation.validation_num_video_frames
        if n is not None and largest_4k_plus_1(n) != n:
            valid = [v for v in nearest_4k_plus_1(n) if v >= MIN_VALIDATION_FRAMES] or [MIN_VALIDATION_FRAMES]
            out.append(f"validation_num_video_frames {n} is not 4k+1; nearest valid: {' or '.join(map(str, valid))}")
        elif n is not None and n < MIN_VALIDATION_FRAMES:
            out.append(
                f"validation_num_video_frames {n} is below {MIN_VALIDATION_FRAMES}: diffusers' I2V first-frame "
                "normalisation turns 5-13 frames into NaN, and a shorter preview says little about motion; "
                f"use {MIN_VALIDATION_FRAMES} or more (17, 33, 61, 121...)"
            )
        return out

    def _dataset_problems(self) -> list[str]:
        if not self.is_i2v:
            return []
        return [
            f"dataset {ds.id!r} is an image dataset, but {self.flavour.name!r} (image-to-video) learns the frames "
            "after the first one, and an image has none; use video datasets"
            for ds in self.spec.image_datasets
        ]

    def _validation_problems(self) -> list[str]:
        out = []
        v = self.spec.validation
        align = NABLA_ALIGNMENT if self.flavour.options["nabla"] else 16
        for w, h in parse_resolution_list(v.validation_resolution or self.defaults.validation_resolution):
            if w % align or h % align:
                why = "NABLA sparse attention (this flavour) needs" if align == NABLA_ALIGNMENT else "Kandinsky 5 needs"
                out.append(f"validation_resolution {w}x{h}: {why} sides that are multiples of {align} px")
        if v.validation_using_datasets and self.is_i2v:
            ids = {ds.id: ds for ds in self.spec.datasets}
            if not v.eval_dataset_id:
                out.append("validation_using_datasets is set but eval_dataset_id names no dataset")
            elif v.eval_dataset_id not in ids or ids[v.eval_dataset_id].dataset_type not in ("image", "video"):
                out.append(f"eval_dataset_id {v.eval_dataset_id!r} is not an image or video dataset of this config")
        return out

    def _scale_warnings(self) -> list[str]:
        """Where diffusers' size rule would sample a LoRA with another RoPE scale than it was trained with."""
        from ..data.buckets import MEGAPIXEL, resolution_of

        sizes: list[tuple[str, int, int]] = []
        for ds in self.spec.training_datasets:
            unit, value = resolution_of(ds)
            side = round(math.sqrt(value * MEGAPIXEL) if unit == "area" else value)
            sizes.append((f"dataset {ds.id!r} (about {side}x{side} px)", side, side))
        for w, h in parse_resolution_list(self.spec.validation.validation_resolution or "768x512"):
            sizes.append((f"validation_resolution {w}x{h}", w, h))
        ours = self.scale_factor
        out = []
        for what, w, h in sizes:
            theirs = diffusers_scale_factor(w, h)
            if theirs != ours:
                out.append(
                    f"{what}: {self.flavour.name!r} trains and validates with RoPE scale {ours} (the authors' "
                    f"setting for this flavour), but diffusers' pipeline picks {theirs} at this size (and ComfyUI "
                    "may too), so the LoRA can look different there; sample at 480-854 px sides for Lite/SD or "
                    "above for Pro HD, or pass the scale explicitly"
                )
        return out

    def _eval_dataset_warnings(self) -> list[str]:
        v = self.spec.validation
        if not self.is_i2v and (v.validation_using_datasets or v.eval_dataset_id):
            return [
                f"validation_using_datasets / eval_dataset_id only apply to I2V; {self.flavour.name!r} ignores them"
            ]
        return []

    def lora_metadata_extra(self) -> dict[str, str]:
        extra = super().lora_metadata_extra()
        extra["rope_scale_factor"] = ",".join(f"{s:g}" for s in self.scale_factor)
        if self.is_i2v:
            extra["i2v_condition"] = "latent frame 0 clean (encoded alone), mask 1, left out of the loss"
        return extra

    def _check_transformer(self, transformer: torch.nn.Module) -> None:
        if self.is_i2v and not transformer.config.visual_cond:
            raise ConfigError(
                f"{self.source} holds a transformer without visual_cond, but {self.flavour.name!r} is image-to-video",
                "point pretrained_model_name_or_path at a Kandinsky 5 I2V model, or choose a t2v flavour",
            )

    # ------------------------------------------------------------------ latents
    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The HunyuanVideo VAE with the memory options of ``spec.memory`` applied (encode and decode alike)."""
        from diffusers import AutoencoderKLHunyuanVideo

        vae = self._from_pretrained(AutoencoderKLHunyuanVideo, "vae", torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)
        memory = getattr(self.spec, "memory", None)
        if getattr(memory, "vae_enable_tiling", False):
            vae.enable_tiling()
        if getattr(memory, "vae_enable_slicing", False):
            vae.enable_slicing()
        if getattr(memory, "vae_enable_patch_conv", False):
            from ..memory.patch_conv import enable_patch_conv

            enable_patch_conv(vae)
        return vae

    def latent_cache_identity(self) -> dict[str, Any]:
        identity = super().latent_cache_identity()
        identity["convention"] = "z*scale (no shift), channels-last (F',H/8,W/8,C), mean+std, (B,F,3,H,W) clips"
        if self.is_i2v:
            identity["first_frame"] = "also encoded alone (the I2V condition)"
        return identity

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Clips ``(B, F, 3, H, W)`` or images ``(B, 3, H, W)`` in [-1, 1] -> per sample ``(F', H/8, W/8, 16)``
        scaled posterior mean and std; I2V also keeps frame 0 encoded alone (``first_mean``/``first_std``)."""
        if pixels.dim() == 4:
            video = pixels.unsqueeze(2)  # an image is a one-frame clip
        elif pixels.dim() == 5:
            video = pixels.permute(0, 2, 1, 3, 4)  # the VAE wants (B, 3, F, H, W)
        else:
            raise ValueError(f"expected (B, F, 3, H, W) or (B, 3, H, W) pixels, got shape {tuple(pixels.shape)}")
        frames = video.shape[2]
        if largest_4k_plus_1(frames) != frames:
            raise ValueError(f"a Kandinsky 5 clip needs 4k+1 frames, got {frames}")
        out = [{"mean": m, "std": s} for m, s in self._encode(vae, video)]
        if self.is_i2v:
            for entry, (m, s) in zip(out, self._encode(vae, video[:, :, :1])):
                entry["first_mean"], entry["first_std"] = m, s
        return out

    def _encode(self, vae: torch.nn.Module, video: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        param = next(vae.parameters())
        dist = vae.encode(video.to(param.device, param.dtype)).latent_dist
        scale = vae.config.scaling_factor
        mean, std = dist.mean.float() * scale, dist.std.float() * scale
        return [(_channels_last(mean[i]).cpu(), _channels_last(std[i]).cpu()) for i in range(mean.shape[0])]

    @torch.no_grad()
    def decode_for_crepa(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Scaled channels-last latents (B, F', h, w, C) -> frames (B, F, 3, H, W) in [0, 1] (CREPA's teacher input)."""
        param = next(vae.parameters())
        z = latents.permute(0, 4, 1, 2, 3).to(param.device, param.dtype) / vae.config.scaling_factor
        pixels = vae.decode(z).sample.float().clamp(-1, 1)
        return ((pixels + 1) * 0.5).permute(0, 2, 1, 3, 4).contiguous()

    def sample_latents(self, items: list[dict[str, torch.Tensor]], generator: torch.Generator) -> torch.Tensor:
        """x0 ~ N(mean, std) per clip; for I2V, latent frame 0 is a draw of frame 0 encoded alone (see module doc)."""
        x0 = super().sample_latents(items, generator)
        if self.is_i2v:
            means = torch.stack([it["first_mean"] for it in items]).float()
            stds = torch.stack([it["first_std"] for it in items]).float()
            x0[:, :1] = means + stds * torch.randn(means.shape, generator=generator, dtype=torch.float32)
        return x0

    # ------------------------------------------------------------------ training step
    def prepare_noisy(
        self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T2V: the plain interpolation. I2V: latent frame 0 stays clean and weighs 0 in the loss."""
        noisy, _ = super().prepare_noisy(x0, noise, sigma)
        if not self.is_i2v:
            return noisy, None
        noisy = torch.cat([x0[:, :1], noisy[:, 1:]], dim=1)
        weights = torch.ones(x0.shape[0], x0.shape[1], 1, 1, 1, dtype=torch.float32)
        weights[:, 0] = 0.0
        return noisy, weights

    def model_input(
        self, transformer: torch.nn.Module, noisy: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[noisy | zeros | mask]`` for visual_cond checkpoints: mask 1 on latent frame 0 for I2V, else 0.

        The condition channels stay zero for I2V too: the image is *in* frame 0 of ``noisy`` (see
        :meth:`prepare_noisy`), exactly as the authors' sampler and diffusers' I2V pipeline feed it.
        """
        if condition is not None:
            raise ConfigError("Kandinsky 5 video takes its I2V condition in latent frame 0, not as a separate latent")
        if not transformer.config.visual_cond:
            return noisy
        mask = noisy.new_zeros(*noisy.shape[:-1], 1)
        if self.is_i2v:
            mask[:, :1] = 1.0
        return torch.cat([noisy, torch.zeros_like(noisy), mask], dim=-1)

    def tread_context(self, transformer: torch.nn.Module) -> AbstractContextManager[Any]:
        """TREAD as in the base, but I2V always keeps every token of the clean condition frame."""
        if not self.is_i2v:
            return super().tread_context(transformer)
        from ..routing.kandinsky5 import tread_routing
        from ..routing.tread import keep_first_frame

        return tread_routing(transformer, self.spec.routing.tread_config, force_keep=keep_first_frame)

    # ------------------------------------------------------------------ validation
    def prepare_validation(self, index: DatasetIndex) -> None:
        """Pick the I2V validation image once (the engine calls this before rendering; a no-op for T2V).

        The first frame of the first training clip (:func:`~trainer_core.data.first_frame`, same
        resize and crop as training), or with ``validation_using_datasets`` the first sample of
        ``eval_dataset_id`` (an image, or a clip's first frame). A dataset kept out of training
        (``disabled``) is scanned on its own for this.
        """
        if not self.is_i2v or self.validation_image is not None:
            return
        from ..data import first_frame, load_pixels

        v = self.spec.validation
        if v.validation_using_datasets and v.eval_dataset_id:
            samples = [s for s in index.samples if s.dataset_id == v.eval_dataset_id] or self._scan_eval_dataset()
        else:
            samples = [s for s in index.samples if s.is_video]
        if not samples:
            raise ConfigError("no image or clip to condition I2V validation on", "add a video dataset")
        sample = samples[0]
        pixels = first_frame(sample) if sample.is_video else load_pixels(sample)
        self.validation_image = _to_pil(pixels)
        log.info("I2V validation is conditioned on the first frame of %s", sample.path)

    def _scan_eval_dataset(self) -> list[Any]:
        from ..data.discovery import discover

        ds = next(d for d in self.spec.datasets if d.id == self.spec.validation.eval_dataset_id)
        alone = self.spec.model_copy(update={"datasets": [ds.model_copy(update={"disabled": False})]})
        return discover(alone, self.spec.training.aspect_bucket_alignment or 16, frame_rule=self.frame_rule).samples

    def _conditioning_image(self, width: int, height: int) -> Image.Image:
        from PIL import Image, ImageOps

        if self.validation_image is None:  # the engine did not call prepare_validation: scan the data ourselves
            from ..data.discovery import discover

            alignment = self.spec.training.aspect_bucket_alignment or self.bucket_alignment
            self.prepare_validation(discover(self.spec, alignment, frame_rule=self.frame_rule))
        assert self.validation_image is not None
        return ImageOps.fit(self.validation_image, (width, height), Image.Resampling.LANCZOS)

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
    ) -> RenderedVideo:
        """One validation clip through diffusers' Kandinsky5T2VPipeline / Kandinsky5I2VPipeline.

        Our cached embeddings are passed in (prompt and negative in separate passes, never padded).
        Two things are set back to the authors' way: the RoPE scale is the flavour's, not
        diffusers' size rule, and the timestep reaches the transformer in fp32 (the pipelines cast
        it to the transformer's dtype; bf16 would round ``1000 * sigma`` to a multiple of 4).
        ``guidance_rescale`` is not supported by the pipelines and is ignored.
        """
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

        from ..media import RenderedVideo

        attention = getattr(transformer.config, "attention_type", "regular")
        if attention == "nabla" and (width % NABLA_ALIGNMENT or height % NABLA_ALIGNMENT):
            raise ConfigError(
                f"validation_resolution {width}x{height}: this checkpoint samples with NABLA sparse attention, "
                f"which needs sides that are multiples of {NABLA_ALIGNMENT} px",
                "e.g. 768x512 or 1024x1024",
            )
        pipeline_cls = Kandinsky5I2VPipeline if self.is_i2v else Kandinsky5T2VPipeline
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
        pipe._get_scale_factor = lambda height, width: self.scale_factor  # the authors' per-flavour RoPE scale
        device = next(transformer.parameters()).device
        kwargs = _pipeline_text(prompt, negative, device, transformer.dtype)
        if self.is_i2v:
            kwargs["image"] = self._conditioning_image(width, height)
        with fp32_timesteps(transformer, pipe.scheduler):
            result = pipe(
                width=width,
                height=height,
                num_frames=self.validation_frames,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
                **kwargs,
            )
        return RenderedVideo(list(result.frames[0]), self.framerate)


def _pipeline_text(
    prompt: dict[str, torch.Tensor], negative: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Our cached embeddings as the K5 pipelines take them: Qwen tokens, CLIP pooled, and cu_seqlens."""
    kwargs = {}
    for prefix, text in (("", prompt), ("negative_", negative)):
        n = int(text["prompt_lengths"][0])
        kwargs[f"{prefix}prompt_embeds_qwen"] = text["prompt_embeds"][:1, :n].to(device, dtype)
        kwargs[f"{prefix}prompt_embeds_clip"] = text["pooled_prompt_embeds"][:1].to(device, dtype)
        kwargs[f"{prefix}prompt_cu_seqlens"] = torch.tensor([0, n], dtype=torch.int32, device=device)
    return kwargs


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")
