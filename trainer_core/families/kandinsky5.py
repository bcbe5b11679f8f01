"""Kandinsky 5: what the image family (:mod:`.kandinsky5_image`) and the video family
(:mod:`.kandinsky5_video`) share.

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
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .base import ModelFamily, TextEncoding

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


I2I_TORCHVISION_HINT = (
    "Kandinsky 5 i2i feeds the reference image to Qwen2.5-VL through its Qwen2VLProcessor, which "
    "transformers can only build with torchvision. Install a torchvision that matches your torch "
    "(e.g. pip install torch==2.14.1 torchvision==0.29.1, or the CPU wheels from "
    "https://download.pytorch.org/whl/cpu), or run inside a ComfyUI install, which ships torchvision. "
    "Text-to-image flavours (t2i-lite-sft, t2i-lite-pretrain) work without it."
)


class Kandinsky5Base(ModelFamily):
    """Everything Kandinsky 5 image and video share. Subclasses set flavours, VAE and rendering.

    Flavour options read here: ``template`` (a key of :data:`TEMPLATES`), ``scale_factor`` (RoPE
    scale per axis) and ``sampling_shift`` (the shift the authors sample with).
    """

    # The authors' LoRA target set for images and video alike (see the image family's docstring).
    default_lora_preset: ClassVar[str] = "attention+ffn"
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
    # CREPA's encoder-free teacher (a deeper block; routing/crepa.py); the video family adds DINOv2
    crepa_teachers: ClassVar[tuple[str, ...]] = ("backbone",)
    # model_type full trains every transformer weight (as SimpleTuner); ComfyUI's K5 names are diffusers'
    supports_full_finetune: ClassVar[bool] = True
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
        return self._static_shift_scheduler(self.sampling_shift)

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
        order = self.forward_calls({"prompt_lengths": lengths})
        with self.tread_context(transformer):
            for idx in order:
                n = int(lengths[idx[0]])
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
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    @staticmethod
    def forward_calls(text: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The batch indices of each transformer call :meth:`predict` makes: one per caption length, shortest first."""
        lengths = text["prompt_lengths"]
        return [torch.nonzero(lengths == n, as_tuple=True)[0] for n in sorted(set(lengths.tolist()))]

    def crepa_hidden_size(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.model_dim)

    def token_grid(self, transformer: torch.nn.Module, x0: torch.Tensor) -> tuple[int, int, int]:
        """(frames, rows, columns) of visual tokens for latents ``x0`` (B, F, H, W, C): the patch grid."""
        pt, ph, pw = transformer.config.patch_size
        return x0.shape[1] // pt, x0.shape[2] // ph, x0.shape[3] // pw

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


@contextmanager
def fp32_timesteps(transformer: torch.nn.Module, scheduler: Any) -> Iterator[None]:
    """Give ``transformer`` the scheduler's fp32 timestep where a pipeline passed it in a lower precision.

    diffusers' K5 pipelines (T2I, I2I, T2V and I2V alike) call the transformer with
    ``timestep.to(transformer.dtype)``: in bf16, 857.69 arrives as 856. The model was trained (by the
    authors, whose pipelines and LoRA trainer pass ``1000 * t`` in fp32, and by us) on fp32 timesteps;
    the time embedding runs in fp32 anyway. The current timestep is ``scheduler.timesteps[step_index]``
    (index 0 before the first step); it replaces the passed one only if it rounds to it, so a pipeline that does
    something else is left alone.
    """
    if transformer.dtype == torch.float32:
        yield
        return

    def restore(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        passed = kwargs.get("timestep")
        if passed is None or passed.dtype == torch.float32:
            return args, kwargs
        index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        if index >= len(scheduler.timesteps):
            return args, kwargs
        exact = scheduler.timesteps[index].float().to(passed.device).expand(passed.shape)
        if torch.equal(exact.to(passed.dtype), passed):
            kwargs["timestep"] = exact
        return args, kwargs

    handle = transformer.register_forward_pre_hook(restore, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _channels_last(z: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (C, F, H, W) -> (F, H, W, C)."""
    if z.dim() == 3:
        z = z.unsqueeze(1)
    return z.permute(1, 2, 3, 0).contiguous()
