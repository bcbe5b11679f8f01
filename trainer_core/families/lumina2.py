"""Lumina 2 (Lumina-Image-2.0 and Neta Lumina).

Conventions (../shared/reference/lumina2_conventions.md, checked against the authors' code):
- text: Gemma2, ``system_prompt + " <Prompt Start> " + caption``, right padding to 256 tokens,
  ``hidden_states[-2]`` with the attention mask. We store each caption trimmed to its real
  length: the transformer places image tokens right after the real caption tokens and masks the
  rest, so padding never changes the output (a test pins this), and trimming saves disk and time.
- unconditional text (caption dropout, default negative): the empty string with no system prompt.
- latents: ``(z - shift_factor) * scaling_factor``, channels-first (B, 16, H/8, W/8).
- time: the transformer takes t = 1 - sigma (t = 0 is pure noise) in fp32 and predicts ``x0 - noise``.
- CREPA: the encoder-free ``backbone`` teacher on the main ``layers``, image tokens only
  (:meth:`Lumina2Family.crepa_image_tokens`).
- validation: diffusers' Lumina2Pipeline with plain CFG, sampled with the authors' static shift
  :data:`SAMPLING_SHIFT` (6.0) whatever the repo's scheduler config says.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .base import FamilyDefaults, Flavour, ModelFamily, TextEncoding

BASE_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
NETA_SYSTEM_PROMPT = "You are an assistant designed to generate anime images based on textual prompts."
PROMPT_SEPARATOR = " <Prompt Start> "
SAMPLING_SHIFT = 6.0
"""The static time shift the authors sample Lumina-Image-2.0 with, ``sigma' = s*sigma / (1 + (s-1)*sigma)``.

Source: Alpha-VLLM/Lumina-Image-2.0 @ 4a4d6f8: ``scripts/sample.sh`` sets ``time_shifting_factor=6``,
``sample.py``'s ODE sampler takes ``--t_shift`` (default 6) and its DPM path ``--time_shifting_factor``,
and the Gradio ``demo.py`` "Time shift" slider defaults to 6; the ODE sampler maps its data-fraction
grid t to ``t / (t + s - s*t)``, which is the shift above in noise fraction. Their sampler's dynamic
(resolution-dependent) shift, ``--do_shift``, is off by default. ComfyUI and the published diffusers
scheduler config also use 6.0 (../shared/reference/lumina2_conventions.md).
"""


class Lumina2Family(ModelFamily):
    name: ClassVar[str] = "lumina2"
    flavours: ClassVar[dict[str, Flavour]] = {
        "2.0": Flavour("2.0", "Alpha-VLLM/Lumina-Image-2.0", "Lumina-Image-2.0", {"system_prompt": BASE_SYSTEM_PROMPT}),
        "neta-lumina": Flavour(
            "neta-lumina",
            "terminusresearch/neta-lumina-v1",
            "Neta Lumina (anime)",
            {"system_prompt": NETA_SYSTEM_PROMPT},
        ),
    }
    default_flavour: ClassVar[str] = "2.0"
    defaults: ClassVar[FamilyDefaults] = FamilyDefaults(
        learning_rate=1e-4,
        resolution=1024,
        resolution_type="pixel_area",
        validation_guidance=4.0,
        validation_resolution="1024x1024",
        validation_negative_prompt="",
        train_shift=3.0,
        auto_shift=True,
        tokenizer_max_length=256,
    )
    bucket_alignment: ClassVar[int] = 64
    lora_presets: ClassVar[dict[str, list[str]]] = {
        "attention": ["to_q", "to_k", "to_v", "to_out.0"],
        "attention+ffn": [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "feed_forward.linear_1",
            "feed_forward.linear_2",
            "feed_forward.linear_3",
        ],
    }
    supports_full_finetune: ClassVar[bool] = True
    # CREPA's encoder-free teacher (a deeper layer; routing/crepa.py). SimpleTuner's DINOv2 image REPA
    # and self_flow (an EMA teacher forward on a cleaner view) are not built here.
    crepa_teachers: ClassVar[tuple[str, ...]] = ("backbone",)
    # Kept in full precision under base_model_precision: patch/caption embedders, the timestep
    # embedding, the final norm+projection, and every *norm* (which includes each block's norm1.linear,
    # the adaLN modulation). Only attention and feed-forward linears are quantised.
    quantization_exclude: ClassVar[list[str]] = ["x_embedder", "time_caption_embed", "norm_out", "*norm*"]

    # ------------------------------------------------------------------ spec
    @property
    def system_prompt(self) -> str:
        if self.spec.model.system_prompt is not None:
            return self.spec.model.system_prompt
        return self.flavour.options["system_prompt"]

    @property
    def max_length(self) -> int:
        return self.spec.model.tokenizer_max_length or self.defaults.tokenizer_max_length

    def check_spec(self) -> list[str]:
        if self.max_length > 512:
            raise ConfigError("tokenizer_max_length above 512 is not supported by Lumina 2", "use 256 (default)")
        return []

    def format_prompt(self, text: str, role: str = "caption") -> str:
        """The exact string the tokenizer sees. Empty captions and negatives carry no system prompt."""
        if role == "negative" or text == "":
            return text
        return self.system_prompt + PROMPT_SEPARATOR + text

    # ------------------------------------------------------------------ loading
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Any:
        from transformers import AutoTokenizer, Gemma2Model

        tokenizer = self._from_pretrained(AutoTokenizer, "tokenizer")
        tokenizer.padding_side = "right"
        encoder = self._from_pretrained(Gemma2Model, "text_encoder", dtype=dtype).to(device).eval()
        encoder.requires_grad_(False)
        return tokenizer, encoder

    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        vae = self._from_pretrained(AutoencoderKL, "vae", torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)
        return vae

    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import Lumina2Transformer2DModel

        return self._from_pretrained(Lumina2Transformer2DModel, "transformer", torch_dtype=dtype).to(device)

    def load_scheduler(self) -> Any:
        """The repo's scheduler, pinned to the authors' sampling schedule: static shift :data:`SAMPLING_SHIFT`.

        Validation previews must not depend on what ``scheduler/scheduler_config.json`` a repo or a
        local folder holds: a fine-tune's repo may carry another shift or ``use_dynamic_shifting``, and
        diffusers' Lumina2Pipeline computes its dynamic-shift ``mu`` from ``latents.shape[1]``, which
        for Lumina's channels-first latents is the channel count (16), not the token count.
        """
        return self._static_shift_scheduler(SAMPLING_SHIFT)

    # ------------------------------------------------------------------ text
    def text_cache_identity(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "text_encoder": self.component_identity("text_encoder"),
            "tokenizer": self.component_identity("tokenizer"),
            "max_length": self.max_length,
            "layer": -2,
        }

    @torch.no_grad()
    def encode_text(self, encoders: Any, captions: list[str]) -> list[TextEncoding]:
        tokenizer, encoder = encoders
        tokens = tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        full = tokenizer(captions, padding=False, truncation=False)["input_ids"]
        device = next(encoder.parameters()).device
        ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        hidden = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        out = []
        for i in range(len(captions)):
            n = max(int(mask[i].sum()), 1)  # never zero-length (a tokenizer without <bos> on "")
            out.append(
                TextEncoding(
                    {"prompt_embeds": hidden[i, :n].detach().to("cpu").contiguous()},
                    truncated=len(full[i]) > self.max_length,
                )
            )
        return out

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest caption in the batch; the mask marks real tokens."""
        longest = max(it["prompt_embeds"].shape[0] for it in items)
        dim = items[0]["prompt_embeds"].shape[1]
        embeds = torch.zeros(len(items), longest, dim, dtype=items[0]["prompt_embeds"].dtype)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for i, it in enumerate(items):
            n = it["prompt_embeds"].shape[0]
            embeds[i, :n] = it["prompt_embeds"]
            mask[i, :n] = 1
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    # ------------------------------------------------------------------ latents
    def latent_cache_identity(self) -> dict[str, Any]:
        return {"family": self.name, "vae": self.component_identity("vae"), "convention": "(z-shift)*scale,mean+std"}

    @torch.no_grad()
    def encode_pixels(self, vae: torch.nn.Module, pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        param = next(vae.parameters())
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        shift = vae.config.shift_factor or 0.0
        scale = vae.config.scaling_factor
        mean = ((dist.mean.float() - shift) * scale).cpu()
        std = (dist.std.float() * scale).cpu()
        return [{"mean": mean[i].contiguous(), "std": std[i].contiguous()} for i in range(mean.shape[0])]

    def image_seq_len(self, x0: torch.Tensor) -> int:
        patch = 2
        return (x0.shape[-2] // patch) * (x0.shape[-1] // patch)

    # ------------------------------------------------------------------ training step
    def predict(
        self,
        transformer: torch.nn.Module,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        dtype = self.compute_dtype(transformer)
        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=1.0 - sigma.float(),  # fp32, as the authors and diffusers' pipeline pass it
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            encoder_attention_mask=text["prompt_attention_mask"],
            return_dict=False,
        )[0]

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 - noise

    # ------------------------------------------------------------------ CREPA (routing/crepa.py)
    @staticmethod
    def forward_calls(text: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`predict` makes one transformer call for the whole batch (captions padded and masked)."""
        embeds = text["prompt_embeds"]
        return [torch.arange(embeds.shape[0], device=embeds.device)]

    def token_grid(self, transformer: torch.nn.Module, x0: torch.Tensor) -> tuple[int, int, int]:
        """(1, rows, columns) of image tokens for latents ``x0`` (B, C, H, W): the patch grid, row-major."""
        p = int(transformer.config.patch_size)
        return 1, x0.shape[-2] // p, x0.shape[-1] // p

    def crepa_hidden_size(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.hidden_size)

    def crepa_image_tokens(self, text: dict[str, torch.Tensor]) -> Any:
        """The image tokens of a main layer's output, which holds the joint sequence.

        Sample i's row is its real caption tokens (``n_i``, the mask's sum), then its image tokens,
        then padding up to the batch's longest ``n + image tokens`` (diffusers' Lumina2 transformer
        and SimpleTuner's copy of it lay it out so). The image tokens are ``[n_i, n_i + image)``, with
        ``image = row length - max n``: each sample's slice starts at its own caption length.
        """
        lengths = text["prompt_attention_mask"].sum(dim=1)

        def select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            n = lengths[idx.to(lengths.device)].to(x.device)
            image = x.shape[1] - int(n.max())
            positions = n[:, None] + torch.arange(image, device=x.device)
            return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))

        return select

    # ------------------------------------------------------------------ validation
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
    ) -> Any:
        """Render through diffusers' Lumina2Pipeline with plain CFG (no normalisation, no truncation).

        Plain CFG is what ComfyUI samples with, so previews look like what users will get there.
        """
        from diffusers import Lumina2Pipeline

        pipe = Lumina2Pipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        device = next(transformer.parameters()).device
        dtype = transformer.dtype
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # diffusers wants prompt and negative of one length: pad both (padding is masked out)
        length = max(prompt["prompt_embeds"].shape[1], negative["prompt_embeds"].shape[1])
        prompt, negative = _pad_text(prompt, length), _pad_text(negative, length)
        result = pipe(
            prompt_embeds=prompt["prompt_embeds"].to(device, dtype),
            prompt_attention_mask=prompt["prompt_attention_mask"].to(device),
            negative_prompt_embeds=negative["prompt_embeds"].to(device, dtype),
            negative_prompt_attention_mask=negative["prompt_attention_mask"].to(device),
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            cfg_normalization=False,
            cfg_trunc_ratio=1.0,
            output_type="pil",
        )
        return result.images[0]

    def lora_metadata_extra(self) -> dict[str, str]:
        return {"system_prompt": self.system_prompt}

    # ------------------------------------------------------------------ adapters
    def _fuses_qkv(self) -> bool:
        """LyCORIS trains on one fused qkv projection: ComfyUI holds only the fused weight, and a
        Kronecker (or Hadamard) delta of three projections is not in general a delta it can express."""
        return self.spec.lora.lora_type == "lycoris"

    def adapter_target_modules(self) -> list[str]:
        targets = self.lora_target_modules()
        if self._fuses_qkv():
            from .lumina2_qkv import fused_lora_targets

            return fused_lora_targets(targets)
        return targets

    def prepare_for_adapter(self, transformer: torch.nn.Module) -> None:
        if self._fuses_qkv():
            from .lumina2_qkv import fuse_qkv_projections

            fuse_qkv_projections(transformer)


def _pad_text(text: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    pad = length - text["prompt_embeds"].shape[1]
    if pad <= 0:
        return text
    return {
        "prompt_embeds": torch.nn.functional.pad(text["prompt_embeds"], (0, 0, 0, pad)),
        "prompt_attention_mask": torch.nn.functional.pad(text["prompt_attention_mask"], (0, pad)),
    }
