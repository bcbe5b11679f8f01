"""Kandinsky 5 (image; video builds on the same base).

Conventions (../shared/reference/kandinsky5_conventions.md, checked against the authors' code
kandinskylab/kandinsky-5; where diffusers, ComfyUI or SimpleTuner differ we follow the authors,
because that is what the base model was trained with):

- text: Qwen2.5-VL with the authors' prompt templates (spelled "promt", lines joined by "\\n"),
  last hidden state, cropped at the first user token (image 41, image_edit 55, video 129; diffusers
  uses 40 / 54 / 128 with its own spelling), at most ``max_length + crop`` tokens with truncation.
  Each caption is stored trimmed to its real tokens after the crop. CLIP-L sees the raw caption:
  ``pooler_output``, 77 tokens, padded. The template and crop of every K5 family live in
  :data:`TEMPLATES` only.
- latents: ``z * scaling_factor`` with **no** shift, although the Flux VAE's config carries
  ``shift_factor`` 0.1159. The authors and diffusers' K5 pipelines never subtract it (ComfyUI and
  SimpleTuner do); training on shifted latents would spend LoRA capacity on a constant bias and
  cast a colour offset wherever the model is sampled the authors' way. Layout is channels-last
  ``(B, F, H/8, W/8, C)`` with F = 1 for images.
- time: the transformer gets ``1000 * sigma`` in fp32 (sigma = 1 is pure noise) and predicts
  ``noise - x0``. RoPE positions are ``arange`` over latent frames and patches, and over the text
  tokens; the RoPE ``scale_factor`` is per flavour ((1, 1, 1) for images).
- visual conditioning: checkpoints with ``visual_cond`` take 33 channels
  ``[noisy 16 | condition 16 | mask 1]``; with no condition the condition is zeros and the mask 0,
  as in the authors' sampler.

Padding. diffusers' ``Kandinsky5Transformer3DModel.forward`` takes no text mask, so padded caption
tokens would be attended in text self-attention and cross-attention (the authors mask them). We
never pad: :meth:`Kandinsky5Base.predict` runs one forward pass per distinct caption length in the
batch (captions of equal length still share a pass) and puts the predictions back in batch order.
That is exact by construction, needs no stateful attention processor (a mask set outside the
forward call would be missing when gradient checkpointing recomputes a block during backward) and
works with every attention backend. It costs little: at training sizes each image has thousands of
tokens, so one sample already fills the GPU. ``tests/test_kandinsky5_image.py`` pins that a batch of
captions of different lengths gives the same prediction and loss as its items one at a time.

Qwen tokenizer. The published repos store a ``Qwen2VLProcessor`` as ``tokenizer``, which
transformers cannot build without torchvision. Text-only encoding needs only its tokenizer, so it is
loaded as ``Qwen2Tokenizer`` from the same folder. i2i feeds the reference image to Qwen and needs
the real processor; see ``Kandinsky5ImageFamily.check_spec``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..spec import parse_resolution_list
from .base import FamilyDefaults, Flavour, ModelFamily, TextEncoding

log = logging.getLogger(__name__)

IMAGE_PAD_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
CLIP_MAX_LENGTH = 77
_PROMPT_IMAGES = "half size, bicubic; caption capped, image tokens whole"  # i2i text cache identity
QWEN_MAX_LENGTH_LIMIT = 512  # the authors' own text_embedder config; SimpleTuner caps at 256


@dataclass(frozen=True)
class PromptTemplate:
    """One of the authors' Qwen2.5-VL templates and the index of its first user token."""

    name: str
    text: str
    crop: int
    with_images: bool = False  # image_edit: the user turn ends after the image tokens

    def format(self, caption: str, n_images: int = 0) -> str:
        """The exact string Qwen sees. image_edit appends one image block per image, then closes the turn."""
        body = self.text.format(caption)
        if self.with_images:
            body += IMAGE_PAD_TOKENS * n_images + "<|im_end|>"
        return body


TEMPLATES: dict[str, PromptTemplate] = {
    "image": PromptTemplate(
        "image",
        "\n".join(
            (
                "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
                "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
                "<|im_start|>user\n{}<|im_end|>",
            )
        ),
        41,
    ),
    "image_edit": PromptTemplate(
        "image_edit",
        "\n".join(
            (
                "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) "
                "and target image (second image), create an interesting text prompt that can be used together "
                "with the source image to create the target image:<|im_end|>",
                "<|im_start|>user\n{}",
            )
        ),
        55,
        with_images=True,
    ),
    "video": PromptTemplate(
        "video",
        "\n".join(
            (
                "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
                "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the "
                "objects.",
                "Describe the location of the video, main characters or objects and their action.",
                "Describe the dynamism of the video and presented actions.",
                "Name the visual style of the video: whether it is a professional footage, user generated content, "
                "some kind of animation, video game or scren content.",
                "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
                "Pay attention to the order of key actions shown in the scene.<|im_end|>",
                "<|im_start|>user\n{}<|im_end|>",
            )
        ),
        129,
    ),
}


@dataclass
class Kandinsky5TextEncoders:
    """Both text encoders and their tokenizers, loaded together for the text cache."""

    qwen_tokenizer: Any
    qwen: torch.nn.Module
    clip_tokenizer: Any
    clip: torch.nn.Module


def torchvision_available() -> bool:
    """True only if torchvision imports: a CUDA-only wheel next to CPU torch raises RuntimeError."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


class Kandinsky5Base(ModelFamily):
    """Everything Kandinsky 5 image and video share. Subclasses set flavours, VAE and rendering.

    Flavour options read here: ``template`` (a key of :data:`TEMPLATES`), ``scale_factor`` (RoPE
    scale per axis) and ``sampling_shift`` (the shift the authors sample with).
    """

    default_lora_preset: ClassVar[str] = "attention"
    # Kept in full precision under base_model_precision: the time/text/pooled/visual embeddings, every
    # modulation layer (kept in fp32 by the model itself), the final out_layer and the norms. Only the
    # attention and feed-forward linears of the blocks are quantised.
    quantization_exclude: ClassVar[list[str]] = [
        "time_embeddings",
        "text_embeddings",
        "pooled_text_embeddings",
        "visual_embeddings",
        "*modulation*",
        "out_layer",
        "*norm*",
    ]
    supports_tread: ClassVar[bool] = True  # see tread_context
    # Qwen2.5-VL (text_encoder, tokenizer) and CLIP-L (text_encoder_2, tokenizer_2): see load_text_encoders
    weight_folders: ClassVar[tuple[str, ...]] = ModelFamily.weight_folders + ("text_encoder_2", "tokenizer_2")
    lora_presets: ClassVar[dict[str, list[str]]] = {
        # Qualified names: "in_layer"/"out_layer" alone would also hit the embeddings, the modulation
        # layers and the final projection. Modulation is never targeted (it is kept in fp32 and
        # scales whole residual branches).
        "attention": [
            "self_attention.to_query",
            "self_attention.to_key",
            "self_attention.to_value",
            "cross_attention.to_query",
            "cross_attention.to_key",
            "cross_attention.to_value",
        ],
        "attention+ffn": [
            "self_attention.to_query",
            "self_attention.to_key",
            "self_attention.to_value",
            "self_attention.out_layer",
            "cross_attention.to_query",
            "cross_attention.to_key",
            "cross_attention.to_value",
            "cross_attention.out_layer",
            "feed_forward.in_layer",
            "feed_forward.out_layer",
        ],
    }

    # ------------------------------------------------------------------ spec
    @property
    def template(self) -> PromptTemplate:
        return TEMPLATES[self.flavour.options["template"]]

    @property
    def max_length(self) -> int:
        return self.spec.model.tokenizer_max_length or self.defaults.tokenizer_max_length

    @property
    def scale_factor(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.flavour.options.get("scale_factor", (1.0, 1.0, 1.0)))  # type: ignore[return-value]

    @property
    def sampling_shift(self) -> float:
        return float(self.flavour.options["sampling_shift"])

    def check_spec(self) -> list[str]:
        warnings: list[str] = []
        if self.spec.model.model_type == "full":
            raise ConfigError("model_type 'full' is not implemented for Kandinsky 5", "use model_type 'lora'")
        if self.max_length > QWEN_MAX_LENGTH_LIMIT:
            raise ConfigError(
                f"tokenizer_max_length {self.max_length} is above {QWEN_MAX_LENGTH_LIMIT}, "
                "the longest text the Kandinsky 5 authors encode",
                "use 256 (default)",
            )
        if self.spec.model.system_prompt is not None:
            warnings.append(
                "system_prompt is a Lumina 2 option and is ignored for Kandinsky 5, "
                f"which uses the authors' {self.template.name!r} prompt template"
            )
        return warnings

    def format_prompt(self, text: str, role: str = "caption") -> str:
        """The caption itself: Qwen gets it inside the template, CLIP gets it bare (see encode_text).

        The template is part of ``text_cache_identity``, so changing it still re-encodes.
        Negatives and empty captions go through the template too, as in the authors' sampler.
        """
        return text

    # ------------------------------------------------------------------ loading
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Kandinsky5TextEncoders:
        from transformers import CLIPTextModel, CLIPTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        if self.uses_reference_images:
            from transformers import Qwen2VLProcessor

            qwen_tokenizer = self._from_pretrained(Qwen2VLProcessor, "tokenizer")
            qwen_tokenizer.tokenizer.padding_side = "right"
        else:
            qwen_tokenizer = self._from_pretrained(Qwen2Tokenizer, "tokenizer")
            qwen_tokenizer.padding_side = "right"  # causal encoder: right padding leaves real tokens untouched
        qwen = self._from_pretrained(Qwen2_5_VLForConditionalGeneration, "text_encoder", dtype=dtype)
        if not self.uses_reference_images:
            # Text-only prompts never reach the vision tower (about 0.67 B parameters, 1.3 GB in bf16, on
            # the real 7B encoder): drop it before anything moves to the device. Outputs are unchanged.
            qwen.model.visual = None
        clip_tokenizer = self._from_pretrained(CLIPTokenizer, "tokenizer_2")
        clip = self._from_pretrained(CLIPTextModel, "text_encoder_2", dtype=dtype)
        for model in (qwen, clip):
            model.to(device).eval().requires_grad_(False)
        return Kandinsky5TextEncoders(qwen_tokenizer, qwen, clip_tokenizer, clip)

    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import Kandinsky5Transformer3DModel

        transformer = self._from_pretrained(Kandinsky5Transformer3DModel, "transformer", torch_dtype=dtype)
        self._check_transformer(transformer)
        return transformer.to(device)

    def _check_transformer(self, transformer: torch.nn.Module) -> None:
        """Hook for subclasses: refuse a checkpoint that does not fit the flavour."""

    def load_scheduler(self) -> Any:
        """The repo's scheduler, made to sample with the authors' static shift.

        The authors sample with ``s*t / (1 + (s-1)*t)`` and s = 3 (image) or 10 (video), which is
        FlowMatchEulerDiscreteScheduler's static shift; a repo config that says otherwise is corrected.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self._from_pretrained(FlowMatchEulerDiscreteScheduler, "scheduler")
        config = scheduler.config
        if config.get("shift") != self.sampling_shift or config.get("use_dynamic_shifting"):
            log.info(
                "validation sampling with the authors' shift %s (the repo's scheduler says shift=%s, dynamic=%s)",
                self.sampling_shift,
                config.get("shift"),
                config.get("use_dynamic_shifting"),
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                config, shift=self.sampling_shift, use_dynamic_shifting=False
            )
        return scheduler

    # ------------------------------------------------------------------ text
    def text_cache_identity(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "text_encoder": self.component_identity("text_encoder"),
            "tokenizer": self.component_identity("tokenizer"),
            "text_encoder_2": self.component_identity("text_encoder_2"),
            "tokenizer_2": self.component_identity("tokenizer_2"),
            "template": self.template.text,
            "crop": self.template.crop,
            "max_length": self.max_length,
            "layer": -1,
            "clip": f"pooler_output,{CLIP_MAX_LENGTH},max_length",
            **({"prompt_images": _PROMPT_IMAGES} if self.uses_reference_images else {}),
        }

    @torch.no_grad()
    def encode_text(
        self, encoders: Kandinsky5TextEncoders, captions: list[str], images: list[Any] | None = None
    ) -> list[TextEncoding]:
        """Qwen: templated, last hidden state after the crop, real tokens only. CLIP: pooled, raw caption.

        ``images`` (image editing): per caption, the reference image (PIL, already fitted to the
        output size) or None. Qwen sees it at half size inside the image_edit template, as in the
        authors' i2i code; CLIP never sees it.
        """
        template = self.template
        crop = template.crop
        device = next(encoders.qwen.parameters()).device
        if images is not None and any(im is not None for im in images):
            hidden, mask, truncated = self._encode_qwen_with_images(encoders, captions, images, device)
        else:
            limit = self.max_length + crop
            texts = [template.format(c) for c in captions]
            tok = encoders.qwen_tokenizer
            tok = getattr(tok, "tokenizer", tok)  # the processor's tokenizer when i2i encodes a text-only prompt
            tokens = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            truncated = [len(ids) > limit for ids in tok(texts, padding=False, truncation=False)["input_ids"]]
            mask = tokens["attention_mask"].to(device)
            hidden = encoders.qwen(
                input_ids=tokens["input_ids"].to(device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-1]

        clip_tokens = encoders.clip_tokenizer(
            captions, max_length=CLIP_MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt"
        )
        clip_device = next(encoders.clip.parameters()).device
        pooled = encoders.clip(**{k: v.to(clip_device) for k, v in clip_tokens.items()}).pooler_output

        out = []
        for i in range(len(captions)):
            n = int(mask[i].sum())
            if n <= crop:
                raise ConfigError(
                    f"the Qwen tokenizer turned the {template.name!r} template into only {n} tokens, "
                    f"but the caption starts at token {crop}",
                    "use the tokenizer that ships with the Kandinsky 5 model",
                )
            out.append(
                TextEncoding(
                    {
                        "prompt_embeds": hidden[i, crop:n].detach().to("cpu").contiguous(),
                        "pooled_prompt_embeds": pooled[i].detach().to("cpu").contiguous(),
                    },
                    truncated=truncated[i],
                )
            )
        return out

    def _encode_qwen_with_images(
        self, encoders: Kandinsky5TextEncoders, captions: list[str], images: list[Any], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Qwen2.5-VL over image_edit prompts with their reference images at half size.

        ``tokenizer_max_length`` bounds the caption's own tokens; the image tokens are never cut
        (diffusers cuts the whole sequence, which at 256 tokens would cut into the image of a
        1024 px reference). Returns (last hidden state, attention mask, truncated per caption).
        """
        from PIL import Image

        processor = encoders.qwen_tokenizer
        if not hasattr(processor, "image_processor"):
            raise ConfigError(
                "Kandinsky 5 i2i needs the Qwen2VLProcessor from the model's tokenizer folder", I2I_TORCHVISION_HINT
            )
        tok = processor.tokenizer
        texts, truncated, pictures = [], [], []
        for caption, image in zip(captions, images):
            ids = tok(caption, add_special_tokens=False)["input_ids"]
            cut = len(ids) > self.max_length
            if cut:
                caption = tok.decode(ids[: self.max_length])
            truncated.append(cut)
            texts.append(self.template.format(caption, n_images=0 if image is None else 1))
            if image is not None:
                w, h = image.size
                pictures.append(image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC))
        inputs = processor(text=texts, images=pictures, padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(encoders.qwen.dtype)
        hidden = encoders.qwen(**inputs, output_hidden_states=True).hidden_states[-1]
        return hidden, inputs["attention_mask"], truncated

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest caption and record each length; ``predict`` never attends padding."""
        lengths = [it["prompt_embeds"].shape[0] for it in items]
        first = items[0]["prompt_embeds"]
        embeds = first.new_zeros(len(items), max(lengths), first.shape[1])
        for i, it in enumerate(items):
            embeds[i, : lengths[i]] = it["prompt_embeds"]
        return {
            "prompt_embeds": embeds,
            "prompt_lengths": torch.tensor(lengths, dtype=torch.long),
            "pooled_prompt_embeds": torch.stack([it["pooled_prompt_embeds"] for it in items]),
        }

    # ------------------------------------------------------------------ latents
    def latent_cache_identity(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "vae": self.component_identity("vae"),
            "convention": "z*scale (no shift), channels-last (F,H,W,C), mean+std",
        }

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """(B, 3, H, W) or (B, 3, F, H, W) in [-1, 1] -> per sample (F, H/8, W/8, C) scaled mean and std.

        No ``shift_factor``: the authors encode with ``z * scaling_factor`` only (see module docstring).
        """
        param = next(vae.parameters())
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        scale = vae.config.scaling_factor
        mean, std = dist.mean.float() * scale, dist.std.float() * scale
        out = []
        for i in range(mean.shape[0]):
            out.append({"mean": _channels_last(mean[i]).cpu(), "std": _channels_last(std[i]).cpu()})
        return out

    def image_seq_len(self, x0: torch.Tensor) -> int:
        frames, height, width = x0.shape[1:4]
        return frames * (height // 2) * (width // 2)

    # ------------------------------------------------------------------ training step
    def model_input(
        self, transformer: torch.nn.Module, noisy: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The transformer's visual input: ``noisy``, or ``[noisy | condition | mask]`` for visual_cond models.

        ``condition`` (same shape as ``noisy``) is a reference latent (``z * s``); without one the
        condition channels are zeros and the mask is 0, as in the authors' sampler.
        """
        if not transformer.config.visual_cond:
            if condition is not None:
                raise ConfigError("this Kandinsky 5 checkpoint takes no visual condition (visual_cond is false)")
            return noisy
        mask = noisy.new_zeros(*noisy.shape[:-1], 1)
        if condition is None:
            condition = torch.zeros_like(noisy)
        else:
            mask = mask + 1.0
        return torch.cat([noisy, condition.to(noisy.dtype), mask], dim=-1)

    def visual_rope_pos(self, transformer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """RoPE positions per axis: latent frames, then patch rows and columns."""
        frames, height, width = x.shape[1:4]
        pt, ph, pw = transformer.config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ConfigError(
                f"latent size {frames}x{height}x{width} is not a multiple of the patch size {pt}x{ph}x{pw}",
                "use image sides that are multiples of 16 px",
            )
        limit = 128  # Kandinsky5RoPE3D's table length per axis
        if height // ph > limit or width // pw > limit:
            raise ConfigError(
                f"a {width * 8}x{height * 8} px image is beyond Kandinsky 5's position table ({limit * ph * 8} px)",
                "train at a lower resolution",
            )
        device = x.device
        return [
            torch.arange(frames // pt, device=device),
            torch.arange(height // ph, device=device),
            torch.arange(width // pw, device=device),
        ]

    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        text: dict[str, torch.Tensor],
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction, one forward pass per distinct caption length (never over padding)."""
        dtype = self.compute_dtype(transformer)  # cached: ModelMixin.dtype walks every module
        x = self.model_input(transformer, noisy, condition).to(dtype)
        timestep = sigma.float() * 1000.0  # fp32, as the authors; the time embedding runs in fp32 anyway
        rope = self.visual_rope_pos(transformer, noisy)
        embeds = text["prompt_embeds"].to(dtype)
        pooled = text["pooled_prompt_embeds"].to(dtype)
        lengths = text["prompt_lengths"].to(noisy.device)
        outs: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        with self.tread_context(transformer):
            for n in sorted(set(lengths.tolist())):
                idx = torch.nonzero(lengths == n, as_tuple=True)[0]
                out = transformer(
                    hidden_states=x[idx],
                    encoder_hidden_states=embeds[idx, :n],
                    pooled_projections=pooled[idx],
                    timestep=timestep[idx],
                    visual_rope_pos=rope,
                    text_rope_pos=torch.arange(n, device=x.device),
                    scale_factor=self.scale_factor,
                    return_dict=False,
                )
                outs.append(out[0] if isinstance(out, tuple) else out)
                order.append(idx)
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    # ------------------------------------------------------------------ TREAD hook (logic: trainer_core/routing)
    def tread_context(self, transformer: torch.nn.Module) -> AbstractContextManager[Any]:
        """Token routing around the transformer calls of one training step.

        A no-op unless ``routing.tread_config`` is set and the transformer is training with grad
        enabled, so validation and inference never route. Tokens are drawn from a generator seeded
        from torch's global one, which the engine seeds per step (resume stays exact).
        """
        from ..routing.kandinsky5 import tread_routing

        return tread_routing(transformer, self.spec.routing.tread_config)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def lora_metadata_extra(self) -> dict[str, str]:
        return {
            "text_template": self.template.name,
            "text_crop": str(self.template.crop),
            "latents": "z*scaling_factor (no shift_factor)",
        }


def _channels_last(z: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (C, F, H, W) -> (F, H, W, C)."""
    if z.dim() == 3:
        z = z.unsqueeze(1)
    return z.permute(1, 2, 3, 0).contiguous()


I2I_TORCHVISION_HINT = (
    "Kandinsky 5 i2i feeds the reference image to Qwen2.5-VL through its Qwen2VLProcessor, which "
    "transformers can only build with torchvision. Install a torchvision that matches your torch "
    "(e.g. pip install torch==2.14.1 torchvision==0.29.1, or the CPU wheels from "
    "https://download.pytorch.org/whl/cpu), or run inside a ComfyUI install, which ships torchvision. "
    "Text-to-image flavours (t2i-lite-sft, t2i-lite-pretrain) work without it."
)


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
        from ..data.discovery import list_files
        from ..data.images import IMAGE_EXTENSIONS

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
        so neither is padded. ``guidance_rescale`` is not supported by the pipeline and is ignored.
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
