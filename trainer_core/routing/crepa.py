"""CREPA: cross-frame representation alignment (SimpleTuner's ``crepa_*`` keys), Kandinsky 5 and Lumina 2.

CREPA (arXiv 2506.09229, Eq. 6) adds a regulariser to the flow loss: the hidden states of one
visual block, passed through a small trainable projector, are pulled towards frozen DINOv2 patch
features of the clean clip, frame by frame and also towards the frames ``d`` apart. Meanings and
defaults follow SimpleTuner's ``CrepaRegularizer`` (``helpers/training/crepa.py``) so an imported
config trains the same regulariser:

- capture: the output of visual block ``crepa_block_index`` reshaped to ``(B, T, H*W, D)``. With
  TREAD, a block inside a route holds only the kept tokens; the dropped ones are put back with
  their pre-route values (what un-routing gives them), so every token is aligned. (SimpleTuner
  captures nothing inside a route and stops; here it is allowed.)
- projector: ``LayerNorm(D) -> Linear(D, encoder dim)`` in fp32, trained with the LoRA, saved in
  checkpoints, never exported with the LoRA;
- teacher: the clean latents decoded by the family's VAE, frames resized to
  ``crepa_encoder_image_size`` square, ImageNet-normalised, DINOv2's patch tokens
  (``x_norm_patchtokens`` = the final-layer-normed tokens after the CLS token);
- alignment: the decoded pixel frames are subsampled to the latent frame count (``linspace``
  indices, as SimpleTuner); token counts that differ are interpolated bilinearly to the smaller
  grid (``crepa_spatial_align``), or both are mean-pooled to one token when it is off;
- loss, :func:`crepa_loss`;
- ``crepa_feature_source: backbone``, the encoder-free teacher: the detached output of block
  ``crepa_teacher_block_index`` (default the student block, as SimpleTuner) from the same forward
  calls, with a hidden-to-hidden projector (:class:`Captures`). Kandinsky 5 image and Lumina 2 train
  this one only (a family lists its teachers in ``ModelFamily.crepa_teachers``).

The blocks a ``crepa_*_block_index`` counts (:func:`crepa_blocks`): Kandinsky 5's visual blocks;
Lumina 2's main ``layers``, the joint caption + image blocks after the refiners, 0-based as
SimpleTuner's ``layer_{i}`` hidden-state buffer. A Lumina 2 block holds, per sample, the real
caption tokens, then the image tokens, then padding up to the longest sequence of the batch; only
the image tokens are aligned (``ModelFamily.crepa_image_tokens``). SimpleTuner aligns the whole
joint sequence, caption and padding positions included, token by token with the teacher's.

Two differences from SimpleTuner, both deliberate. The teacher decodes the posterior *mean* of the
cached latent (SimpleTuner decodes the latent it cached, itself one draw), so a clip's teacher
features never change and can be cached on disk (:class:`TeacherFeatures`), keyed like the latent
cache: after the first pass nothing is decoded or encoded again, and DINOv2 and the VAE are not in
memory while the transformer trains. The encoder is loaded with ``transformers`` (``Dinov2Model``)
from a repo id, the Hugging Face cache or a local folder, never ``torch.hub``;
SimpleTuner's hub names map to the Hugging Face repos (:data:`ENCODER_REPOS`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..spec import CrepaSpec, TrainSpec

# SimpleTuner's torch.hub names (and the aliases its _resolve_encoder_name accepts) -> Hugging Face repos.
ENCODER_REPOS: dict[str, str] = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
ENCODER_ALIASES: dict[str, str] = {
    "dino_v2_g": "dinov2_vitg14",
    "dinov2_g": "dinov2_vitg14",
    "dinov2-vitg14": "dinov2_vitg14",
    "dino_v2_s": "dinov2_vits14",
    "dinov2_s": "dinov2_vits14",
    "dinov2-vitb14": "dinov2_vitb14",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
ImageTokens = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``select(block output (b, L, D), batch indices (b,)) -> (b, image tokens, D)``: a family's image tokens."""
_EXAMPLE = "crepa_encoder 'dinov2_vits14' (facebook/dinov2-small), a Hugging Face repo id, or a local folder"


# ---------------------------------------------------------------------- config
def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or Path(name).expanduser().exists()


def resolve_encoder(name: str) -> str:
    """``crepa_encoder`` -> what ``from_pretrained`` loads: a Hugging Face repo id or a local folder path."""
    key = name.strip()
    key = ENCODER_ALIASES.get(key.lower(), key)
    if key in ENCODER_REPOS:
        return ENCODER_REPOS[key]
    lowered = key.lower()
    if "qwen" in lowered and "vl" in lowered:
        raise ConfigError(
            f"crepa_encoder {name!r}: Qwen-VL teachers are not supported yet (DINOv2 only)", f"use {_EXAMPLE}"
        )
    if _looks_like_path(key):
        return str(Path(key).expanduser())
    if key.count("/") != 1:
        raise ConfigError(f"crepa_encoder {name!r} is neither a DINOv2 name, a repo id nor a folder", f"use {_EXAMPLE}")
    return key


def check_crepa(spec: TrainSpec, family_cls: type[ModelFamily]) -> list[str]:
    """Check the ``crepa`` section before any model loads; return warnings.

    The block index against the model's depth is checked when the transformer loads
    (:func:`check_block_index`).
    """
    c = spec.crepa
    if not c.crepa_enabled:
        return []
    teachers = getattr(family_cls, "crepa_teachers", ())
    if not teachers:
        raise ConfigError(
            f"crepa_enabled: CREPA is not available for {family_cls.name}",
            "set crepa_enabled false, or train model_family 'kandinsky5-video' (or 'kandinsky5-image' or "
            "'lumina2' with crepa_feature_source 'backbone')",
        )
    if c.crepa_feature_source not in teachers:
        raise ConfigError(
            f"crepa_feature_source {c.crepa_feature_source!r} is not available for {family_cls.name} "
            f"(it has: {', '.join(teachers)})",
            f"set crepa_feature_source {teachers[0]!r}",
        )
    if c.crepa_feature_source == "backbone":
        return []  # no encoder to check: the teacher is a block of the model
    source = resolve_encoder(c.crepa_encoder)
    if _looks_like_path(source):
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(f"crepa_encoder folder {folder} does not exist", f"use {_EXAMPLE}")
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"crepa_encoder folder {folder} has no config.json (not a transformers DINOv2 model)",
                "point it at a folder saved with Dinov2Model.save_pretrained, e.g. a download of facebook/dinov2-small",
            )
    warnings = []
    if c.crepa_lambda == 0:
        warnings.append("crepa_enabled with crepa_lambda 0: the CREPA loss is computed and logged, but adds nothing")
    return warnings


def crepa_blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The blocks ``crepa_block_index`` and ``crepa_teacher_block_index`` count, from 0.

    Kandinsky 5: ``visual_transformer_blocks``. Lumina 2: ``layers``, the main joint blocks (its
    ``context_refiner`` and ``noise_refiner`` are not counted), as SimpleTuner's ``layer_{i}``.
    """
    blocks = getattr(transformer, "visual_transformer_blocks", None)
    return transformer.layers if blocks is None else blocks


def check_block_index(index: int, transformer: torch.nn.Module, key: str = "crepa_block_index") -> None:
    blocks = len(crepa_blocks(transformer))
    if 0 <= index < blocks:
        return
    if hasattr(transformer, "visual_transformer_blocks"):
        raise ConfigError(
            f"{key} {index} is out of range: this transformer has {blocks} visual blocks (0..{blocks - 1})",
            "SimpleTuner's Kandinsky 5 video recommendation is 8, an encoder-side block",
        )
    raise ConfigError(
        f"{key} {index} is out of range: this transformer has {blocks} main layers (0..{blocks - 1}; "
        "the refiners are not counted)",
        "pick an early layer for crepa_block_index and a deeper one for crepa_teacher_block_index",
    )


# ---------------------------------------------------------------------- the loss (paper Eq. 6)
@dataclass
class CrepaTerms:
    """One batch's alignment: ``total`` (B, T) self + weighted neighbour similarity; ``per_video`` (B,)."""

    self_sim: torch.Tensor
    total: torch.Tensor
    per_video: torch.Tensor

    @property
    def alignment_score(self) -> float:
        """Mean of ``total`` (SimpleTuner's ``crepa_alignment_score``; above 1 unless neighbour sums are normalised)."""
        return float(self.total.detach().mean())

    @property
    def similarity_self(self) -> float:
        return float(self.self_sim.detach().mean())


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, N, D) x (B, T, N, D), both L2-normalised -> (B, T): patch cosine similarities, mean over patches."""
    return (a * b).sum(dim=-1).mean(dim=-1)


def crepa_terms(
    projected: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance: int = 1,
    tau: float = 1.0,
    cumulative: bool = False,
    normalize_neighbour_sum: bool = False,
    normalize_by_frames: bool = True,
) -> CrepaTerms:
    """The alignment of ``projected`` student tokens with ``teacher`` tokens, both (B, T, N, D).

    For frame f: ``sim(f, f)`` plus ``exp(-d / tau) * sim(f, f±d)`` for the neighbours that exist,
    where ``sim(f, k)`` is the mean over patches of the cosine similarity between the student at f
    and the teacher at k; with ``cumulative`` every distance 1..d adds its own ``exp(-k / tau)``
    term. ``d`` is capped at T - 1. With ``normalize_neighbour_sum`` each frame's sum is divided by
    its weights' sum (1 + the neighbours'). A clip's value is the sum over frames, divided by T
    when ``normalize_by_frames``.
    """
    p = F.normalize(projected.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    self_sim = frame_similarity(p, t)
    total = self_sim.clone()
    weights = torch.ones_like(total)
    frames = total.shape[1]
    d = min(int(distance), frames - 1)
    offsets = range(1, d + 1) if cumulative else ([d] if d > 0 else [])
    for k in offsets:
        w = math.exp(-float(k) / max(float(tau), 1e-8))
        total[:, :-k] += w * frame_similarity(p[:, :-k], t[:, k:])  # student f, teacher f + k
        total[:, k:] += w * frame_similarity(p[:, k:], t[:, :-k])  # student f, teacher f - k
        weights[:, :-k] += w
        weights[:, k:] += w
    if normalize_neighbour_sum:
        total = total / weights.clamp_min(torch.finfo(total.dtype).eps)
    per_video = total.sum(dim=1)
    if normalize_by_frames:
        per_video = per_video / float(frames)
    return CrepaTerms(self_sim, total, per_video)


def crepa_loss(projected: torch.Tensor, teacher: torch.Tensor, weight: float, **options: Any) -> torch.Tensor:
    """``-mean over clips of the per-clip alignment * weight`` (the term added to the flow loss)."""
    return -crepa_terms(projected, teacher, **options).per_video.mean() * weight


# ---------------------------------------------------------------------- alignment of the two sides
def align_frames(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample the side with more frames to the other's count (``linspace`` indices, as SimpleTuner)."""
    ts, tt = student.shape[1], teacher.shape[1]
    if ts == tt:
        return student, teacher
    if tt > ts:
        return student, teacher.index_select(1, frame_indices(tt, ts).to(teacher.device))
    return student.index_select(1, frame_indices(ts, tt).to(student.device)), teacher


def frame_indices(available: int, wanted: int) -> torch.Tensor:
    return torch.linspace(0, available - 1, wanted).long()


def _resize_tokens(x: torch.Tensor, shape: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    if shape == target:
        return x
    b, t, n, d = x.shape
    grid = x.reshape(b * t, shape[0], shape[1], d).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, t, target[0] * target[1], d)


def align_tokens(
    student: torch.Tensor,
    student_grid: tuple[int, int],
    teacher: torch.Tensor,
    teacher_grid: tuple[int, int],
    spatial_align: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring both token grids to the smaller one (bilinear), or pool both to one token (``spatial_align`` off)."""
    if student_grid == teacher_grid:
        return student, teacher
    if not spatial_align:
        return student.mean(dim=2, keepdim=True), teacher.mean(dim=2, keepdim=True)
    s_n, t_n = student_grid[0] * student_grid[1], teacher_grid[0] * teacher_grid[1]
    target = student_grid if s_n <= t_n else teacher_grid
    return _resize_tokens(student, student_grid, target), _resize_tokens(teacher, teacher_grid, target)


# ---------------------------------------------------------------------- the coefficient schedule
@dataclass
class CrepaScheduler:
    """``crepa_lambda`` over training: warmup, decay (linear / cosine / polynomial) and cutoffs, as SimpleTuner.

    The similarity EMA and a permanent cutoff are state: :meth:`state_dict` goes into checkpoints.
    """

    base: float
    kind: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: the whole run
    lambda_end: float = 0.0
    power: float = 1.0
    cutoff_step: int = 0
    similarity_threshold: float | None = None
    similarity_ema_decay: float = 0.99
    threshold_mode: str = "permanent"
    total_steps: int = 0
    similarity_ema: float | None = None
    cut_off: bool = False

    @classmethod
    def from_spec(cls, c: CrepaSpec, total_steps: int) -> CrepaScheduler:
        return cls(
            base=float(c.crepa_lambda),
            kind=c.crepa_scheduler,
            warmup_steps=c.crepa_warmup_steps,
            decay_steps=c.crepa_decay_steps,
            lambda_end=float(c.crepa_lambda_end),
            power=float(c.crepa_power),
            cutoff_step=c.crepa_cutoff_step,
            similarity_threshold=c.crepa_similarity_threshold,
            similarity_ema_decay=float(c.crepa_similarity_ema_decay),
            threshold_mode=c.crepa_threshold_mode,
            total_steps=total_steps,
        )

    def scheduled(self, step: int) -> float:
        """The weight at ``step`` (0-based) before any cutoff."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base * step / self.warmup_steps
        if self.kind == "constant":
            return self.base
        decay_steps = self.decay_steps if self.decay_steps > 0 else self.total_steps
        progress = min((step - self.warmup_steps) / max(decay_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "linear":
            return self.base + (self.lambda_end - self.base) * progress
        if self.kind == "cosine":
            return self.lambda_end + (self.base - self.lambda_end) * (1 + math.cos(math.pi * progress)) / 2
        if self.kind == "polynomial":
            return (self.base - self.lambda_end) * (1 - progress) ** self.power + self.lambda_end
        return self.base

    def weight(self, step: int, similarity: float | None = None) -> float:
        """The weight for ``step``, after folding ``similarity`` into the EMA and applying the cutoffs."""
        if similarity is not None:
            ema, decay = self.similarity_ema, self.similarity_ema_decay
            self.similarity_ema = similarity if ema is None else decay * ema + (1 - decay) * similarity
        if self.cut_off and self.threshold_mode == "permanent":
            return 0.0
        hit = (self.cutoff_step > 0 and step >= self.cutoff_step) or (
            self.similarity_threshold is not None
            and self.similarity_ema is not None
            and self.similarity_ema >= self.similarity_threshold
        )
        if hit:
            self.cut_off = True
            return 0.0
        self.cut_off = False
        return self.scheduled(step)

    def state_dict(self) -> dict[str, Any]:
        return {"similarity_ema": self.similarity_ema, "cut_off": self.cut_off}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state.get("similarity_ema")
        self.similarity_ema = None if ema is None else float(ema)
        self.cut_off = bool(state.get("cut_off", False))


# ---------------------------------------------------------------------- capturing the student block
class BlockCapture:
    """Records the output of block ``index`` (:func:`crepa_blocks`) for every forward call made while entered.

    ``outputs`` gives one (b, tokens, D) tensor per call, with every token: when TREAD routes the
    block, the dropped tokens are filled in with their pre-route values (the router's open route),
    exactly what un-routing puts back after the route's last block. The hook is removed on exit,
    before backward, so activation recomputation never records anything; and it runs no op of its
    own, so a checkpointed block saves the same tensors with and without it.
    """

    def __init__(self, transformer: torch.nn.Module, index: int) -> None:
        check_block_index(index, transformer)
        self.transformer = transformer
        self.block = crepa_blocks(transformer)[index]
        self._calls: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = []
        self._handle: Any = None

    def __enter__(self) -> BlockCapture:
        self._calls = []
        self._handle = self.block.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _record(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Only remembers tensors: the hook may run inside a checkpointed block, where an op of ours would
        save tensors that recomputation (without the hook) does not, so the scatter happens in :meth:`tokens`."""
        from .kandinsky5 import Kandinsky5Router

        x = output[0] if isinstance(output, tuple) else output
        router = getattr(getattr(self.transformer, "_gradient_checkpointing_func", None), "__self__", None)
        route = router._open if isinstance(router, Kandinsky5Router) else None
        grid = router.grid if route is not None else None
        routed = route is not None and grid is not None and x.shape[1] != grid.tokens
        self._calls.append((x, (route.saved, route.ids) if routed else None))

    @property
    def outputs(self) -> list[torch.Tensor]:
        """Every call's block output with all its tokens (dropped ones back at their pre-route values)."""
        from .tokens import scatter_tokens

        return [x if r is None else scatter_tokens(r[0], r[1], x) for x, r in self._calls]

    def hidden(
        self, order: Sequence[torch.Tensor], frames: int, per_frame: int, select: ImageTokens | None = None
    ) -> torch.Tensor:
        """The captured image tokens of the whole batch as (B, frames, per_frame, D), in batch order.

        ``order`` lists the batch indices of each forward call (a family may split a batch by
        caption length); the calls' outputs are put back in batch order. ``select(output, indices)``
        keeps a call's image tokens when its block holds others (Lumina 2's caption tokens).
        """
        outputs = self.outputs
        if len(outputs) != len(order):
            raise RuntimeError(f"CREPA captured {len(outputs)} block outputs for {len(order)} forward calls")
        if select is not None:
            outputs = [select(x, idx) for x, idx in zip(outputs, order)]
        x = torch.cat(outputs)
        if len(order) > 1:
            x = x[torch.argsort(torch.cat([o.to(x.device) for o in order]))]
        if x.shape[1] != frames * per_frame:
            raise RuntimeError(f"CREPA: block output {tuple(x.shape)} is not {frames} frames of {per_frame} tokens")
        return x.reshape(x.shape[0], frames, per_frame, x.shape[-1])


# ---------------------------------------------------------------------- the teacher
class DinoTeacher:
    """A frozen DINOv2 (transformers) that turns frames into patch tokens."""

    def __init__(self, source: str, image_size: int, device: torch.device, frames_batch_size: int = -1) -> None:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(source)  # run in fp32, as SimpleTuner
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"crepa_encoder {source!r} could not be loaded as a transformers DINOv2 model: {e}",
                "download it first (huggingface-cli download facebook/dinov2-small), or point crepa_encoder at a "
                "local folder",
            ) from None
        if not hasattr(model.config, "patch_size") or "dinov2" not in model.config.model_type:
            raise ConfigError(f"crepa_encoder {source!r} is a {model.config.model_type} model, not DINOv2", _EXAMPLE)
        self.model = model.to(device, torch.float32).eval().requires_grad_(False)
        self.device = device
        self.image_size = image_size
        self.frames_batch_size = frames_batch_size
        self.skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        self.grid = (image_size // model.config.patch_size,) * 2
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, patches, D) final-layer-normed patch tokens."""
        x = F.interpolate(frames.float().to(self.device), size=(self.image_size,) * 2, mode="bilinear")
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        size = self.frames_batch_size if self.frames_batch_size > 0 else x.shape[0]
        out = [self.model(pixel_values=chunk).last_hidden_state[:, self.skip :] for chunk in x.split(size)]
        return torch.cat(out).float()


def encoder_dim(source: str) -> tuple[int, int]:
    """(hidden size, patch size) of the encoder from its config alone, without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"crepa_encoder {source!r}: its config could not be read: {e}", _EXAMPLE) from None
    return int(config.hidden_size), int(config.patch_size)


@dataclass
class TeacherFeatures:
    """Per-sample teacher features (latent frames, patches, D), computed once and cached on disk.

    ``stores`` maps dataset id -> a :class:`~trainer_core.cache.store.TensorStore` (None: no disk
    cache, computed at every draw). ``latent_key`` is the latent cache's key function and
    ``latents`` loads a sample's cached latent entry; the models load at the first miss only
    (``load_vae`` / ``load_teacher``) and can be released after a pre-pass.
    """

    family: Any
    identity: dict[str, Any]
    latent_key: Callable[[Any], str]
    latents: Callable[[Sequence[Any]], list[dict[str, torch.Tensor]]]
    load_vae: Callable[[], torch.nn.Module]
    load_teacher: Callable[[], DinoTeacher]
    stores: dict[str, Any] | None = None
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    memory_entries: int = 256
    vae: torch.nn.Module | None = None
    teacher: DinoTeacher | None = None
    computed: int = 0  # features decoded and encoded (not read from the cache) since construction
    reused: int = 0  # read from the disk cache

    def key(self, sample: Any) -> str:
        from ..io_utils import stable_hash

        return stable_hash({"crepa": self.identity, "latent": self.latent_key(sample)})

    def _cached(self, sample: Any, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.stores is None:
            return None
        entry = self.stores[sample.dataset_id].get(key)
        if entry is None:
            return None
        self.reused += 1
        return entry["features"]

    def _remember(self, key: str, value: torch.Tensor) -> None:
        if self.memory_entries > 0 and self.stores is not None:
            if len(self.memory) >= self.memory_entries:
                self.memory.pop(next(iter(self.memory)))
            self.memory[key] = value

    def get(self, samples: Sequence[Any]) -> list[torch.Tensor]:
        """The features of ``samples``, in order; misses are decoded and encoded (and cached) now."""
        keys = [self.key(s) for s in samples]
        found = [self._cached(s, k) for s, k in zip(samples, keys)]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            entries = self.latents([samples[i] for i in missing])
            for i, entry in zip(missing, entries):
                features = self._compute(entry["mean"])
                if self.stores is not None:
                    store = self.stores[samples[i].dataset_id]
                    store.put(keys[i], {"features": features}, {"file": str(samples[i].path)})
                found[i] = features
        for k, f in zip(keys, found):
            self._remember(k, f)  # type: ignore[arg-type]
        return found  # type: ignore[return-value]

    def ensure(self, samples: Sequence[Any], progress: Callable[[str, int, int], None] | None = None) -> int:
        """Fill the disk cache for ``samples`` (a pre-pass); returns how many were computed."""
        unique = {(s.dataset_id, self.key(s)): s for s in samples}
        todo = [s for (ds, k), s in unique.items() if self.stores is not None and self.stores[ds].get(k) is None]
        done = len(unique) - len(todo)
        if progress:
            progress("crepa teacher features", done, len(unique))
        for s in todo:
            self.get([s])
            done += 1
            if progress:
                progress("crepa teacher features", done, len(unique))
        self.memory.clear()
        return len(todo)

    def release(self) -> None:
        self.vae = None
        self.teacher = None

    @torch.no_grad()
    def _compute(self, mean: torch.Tensor) -> torch.Tensor:
        """A clip's posterior mean (F', h, w, C) -> (F', patches, D) teacher features."""
        if self.vae is None:
            self.vae = self.load_vae()
        if self.teacher is None:
            self.teacher = self.load_teacher()
        frames = self.family.decode_for_crepa(self.vae, mean.unsqueeze(0))[0]  # (F, 3, H, W) in [0, 1]
        latent_frames = mean.shape[0]
        if frames.shape[0] != latent_frames:
            frames = frames.index_select(0, frame_indices(frames.shape[0], latent_frames).to(frames.device))
        self.computed += 1
        return self.teacher.encode(frames).cpu()


# ---------------------------------------------------------------------- the regulariser
class CrepaRegulariser(torch.nn.Module):
    """The projector and the loss of one run. ``forward`` is never used: see :meth:`loss`."""

    def __init__(self, spec: CrepaSpec, hidden_size: int, encoder_dim: int, teacher_grid: tuple[int, int] | None,
                 total_steps: int) -> None:  # fmt: skip
        super().__init__()
        self.spec = spec
        self.projector = torch.nn.Sequential(torch.nn.LayerNorm(hidden_size), torch.nn.Linear(hidden_size, encoder_dim))
        self.projector.float()
        self.teacher_grid = teacher_grid
        self.scheduler = CrepaScheduler.from_spec(spec, total_steps)

    def loss(
        self, hidden: torch.Tensor, grid: tuple[int, int], teacher: torch.Tensor, step: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The CREPA term for one micro-batch and what to log; None when the scheduled weight is 0.

        ``hidden`` (B, T, h*w, D) is the captured block, ``grid`` its (h, w); ``teacher`` (B, T', N, E):
        DINOv2 features, or (``backbone``) the teacher block's detached hidden states (E = D).
        """
        c = self.spec
        b, t, n, d = hidden.shape
        projected = self.projector(hidden.float().reshape(b * t * n, d)).view(b, t, n, -1)
        projected, teacher = align_frames(projected, teacher.to(projected.device))
        teacher_grid = self.teacher_grid or grid  # backbone: the teacher block has the student's tokens
        projected, teacher = align_tokens(projected, grid, teacher, teacher_grid, c.crepa_spatial_align)
        terms = crepa_terms(
            projected,
            teacher,
            distance=c.crepa_adjacent_distance,
            tau=c.crepa_adjacent_tau,
            cumulative=c.crepa_cumulative_neighbors,
            normalize_neighbour_sum=c.crepa_normalize_neighbour_sum,
            normalize_by_frames=c.crepa_normalize_by_frames,
        )
        score = terms.alignment_score
        weight = self.scheduler.weight(step, similarity=score)
        log = {"crepa_alignment_score": score, "crepa_similarity_self": terms.similarity_self, "crepa_weight": weight}
        if weight == 0:
            log["crepa_loss"] = 0.0
            return None, log
        loss = -terms.per_video.mean() * weight
        log["crepa_loss"] = float(loss.detach())
        return loss, log

    def state(self) -> dict[str, Any]:
        return {"projector": dict(self.projector.state_dict()), "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict(state["projector"])
        self.scheduler.load_state_dict(state.get("scheduler", {}))


class Captures:
    """The student block and, for the ``backbone`` teacher, the teacher block, over the same forward calls."""

    def __init__(self, transformer: torch.nn.Module, student: int, teacher: int | None = None) -> None:
        self.student = BlockCapture(transformer, student)
        self.teacher = None
        if teacher is not None and teacher != student:
            check_block_index(teacher, transformer, "crepa_teacher_block_index")
            self.teacher = BlockCapture(transformer, teacher)
        self.same_block = teacher == student

    def __enter__(self) -> Captures:
        self.student.__enter__()
        if self.teacher is not None:
            self.teacher.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.teacher is not None:
            self.teacher.__exit__(*exc)
        self.student.__exit__(*exc)

    def hidden(
        self, order: Sequence[torch.Tensor], frames: int, per_frame: int, select: ImageTokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student, detached teacher or None) as (B, frames, per_frame, D); ``select``: see BlockCapture.hidden."""
        student = self.student.hidden(order, frames, per_frame, select)
        if self.teacher is not None:
            return student, self.teacher.hidden(order, frames, per_frame, select).detach()
        return student, student.detach() if self.same_block else None
