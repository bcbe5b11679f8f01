"""CLIP score of the validation renders: SimpleTuner's ``evaluation_type: clip``.

SimpleTuner (``helpers/training/evaluation.py``, ``CLIPModelEvaluator``) scores each validation image
against its prompt with torchmetrics' ``clip_score``: the image and the prompt go through
``CLIPProcessor`` (resize the short side, centre crop, CLIP's mean/std; the prompt tokenised and
padded), both through ``CLIPModel`` to their projected embeddings, and the score is
``max(100 * cos(image, prompt), 0)``, the mean taken before the clip at 0 when a batch is scored.
This module computes the same number with transformers alone (torchmetrics is not a dependency):

- ``CLIPImageProcessor`` from the model's folder (the same preprocessing ``CLIPProcessor`` applies),
  or CLIP's standard one at the model's image size when the folder has no preprocessor config;
- the prompt truncated to the text model's 77 positions (recent torchmetrics truncates too);
- embeddings are ``visual_projection(vision_model(...).pooler_output)`` and
  ``text_projection(text_model(...).pooler_output)``, which is what ``get_image_features`` /
  ``get_text_features`` return in every transformers version.

A video render is scored as torchmetrics scores a batch: every frame against the prompt, the mean
of ``100 * cos`` over the frames, then clipped at 0. The run's ``clip_score`` is the mean of the
per-prompt scores (SimpleTuner's ``clip/mean``); the unconditional render (empty prompt) is not scored.

Where SimpleTuner scores every validation, this scores the base model at step 0 too (the step-0
validation render), then every ``eval_steps_interval`` steps (every validation render when unset),
and the final step. The CLIP model is loaded once, on the training device, when it is first needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ConfigError
from ..spec import TrainSpec

log = logging.getLogger(__name__)

_KEY = "pretrained_evaluation_model_name_or_path"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclass
class Evaluation:
    """One evaluation: the mean CLIP score and each prompt's (by validation name)."""

    step: int
    clip_score: float
    scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "clip_score": self.clip_score, "scores": dict(self.scores)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Evaluation:
        return cls(int(raw["step"]), float(raw["clip_score"]), {str(k): float(v) for k, v in raw["scores"].items()})


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source).expanduser().exists()


def check_evaluation(spec: TrainSpec) -> list[str]:
    """Refuse an evaluation that cannot run, before any model loads; return warnings."""
    v = spec.validation
    if v.evaluation_type == "none":
        return []
    if v.validation_disable:
        raise ConfigError(
            "evaluation_type 'clip' scores the validation renders, but validation_disable is set",
            "set validation_disable false, or evaluation_type 'none'",
        )
    if not spec.validation_prompts() and not v.validation_using_datasets:
        raise ConfigError(
            "evaluation_type 'clip' scores the validation renders against their prompts, but there is no "
            "validation_prompt or user_prompt_library",
            "set validation_prompt, or evaluation_type 'none'",
        )
    check_evaluation_model(v.pretrained_evaluation_model_name_or_path)
    return []


def check_evaluation_model(source: str) -> None:
    """A local CLIP folder must exist and hold a model and a tokenizer; a repo id must be cached when offline."""
    source = source.strip()
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"{_KEY} {str(folder.absolute())!r}: no such folder",
                "fix the path, or give a Hugging Face repo id such as openai/clip-vit-large-patch14",
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{_KEY} {folder} has no config.json (not a transformers CLIP model folder)",
                "point it at a folder saved with CLIPModel.save_pretrained and the tokenizer's save_pretrained "
                "(a download of openai/clip-vit-large-patch14)",
            )
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(
                f"{_KEY} {folder} has no tokenizer (tokenizer.json or vocab.json)",
                "save the CLIP tokenizer into the same folder (tokenizer.save_pretrained)",
            )
        return
    from huggingface_hub import constants

    from ..model_source import _cached_snapshot

    if constants.is_offline_mode() and _cached_snapshot(source, None) is None:
        raise ConfigError(
            f"{_KEY} {source!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set",
            f"download it where there is network (huggingface-cli download {source}), or give a local folder",
        )


class ClipScorer:
    """A CLIP model that scores images against prompts (torchmetrics' CLIPScore, see the module doc)."""

    def __init__(self, source: str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
        self.device = torch.device(device)  # where it scores; it waits on the CPU in between (``evaluate``)
        self.model = CLIPModel.from_pretrained(source).float().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            self.processor = CLIPImageProcessor.from_pretrained(source)
        except OSError:  # no preprocessor_config.json: CLIP's standard preprocessing at the model's size
            size = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model.vision_model(pixel_values=pixels.to(self.device))
        emb = self.model.visual_projection(out.pooler_output)
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [prompt], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        emb = self.model.text_projection(out.pooler_output)
        return emb / emb.norm(dim=-1, keepdim=True)

    def score(self, images: list[Image.Image], prompt: str) -> float:
        """``max(mean over images of 100 * cos(image, prompt), 0)``: one image, or a video's frames."""
        cos = (self.image_embeddings(images) @ self.text_embedding(prompt).T).squeeze(-1)
        return max(float(100.0 * cos.mean()), 0.0)


def frames_of(rendered: Any) -> list[Image.Image]:
    """A validation render's images: the image itself, or every frame of a video."""
    frames = getattr(rendered, "frames", None)
    return list(frames) if frames is not None else [rendered]


def evaluate(scorer: ClipScorer, step: int, renders: list[tuple[str, str, Any]]) -> Evaluation | None:
    """Score ``(name, prompt, render)`` triples; None when none has a prompt (only unconditional renders)."""
    scorer.model.to(scorer.device)
    try:
        scores = {name: round(scorer.score(frames_of(r), prompt), 4) for name, prompt, r in renders if prompt.strip()}
    finally:
        scorer.model.to("cpu")
    if not scores:
        return None
    return Evaluation(step, round(sum(scores.values()) / len(scores), 4), scores)


def is_due(spec: TrainSpec, step: int, final: bool = False) -> bool:
    """Whether the validation render at ``step`` is scored: step 0, every interval (or every render), the last."""
    v = spec.validation
    if v.evaluation_type == "none":
        return False
    every = v.eval_steps_interval
    return step == 0 or final or every is None or step % every == 0
