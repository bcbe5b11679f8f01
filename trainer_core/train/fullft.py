"""Full fine-tune (``model_type: full``): every transformer weight trains, behind the adapter interface.

The engine only talks to a :class:`~trainer_core.lora.adapter.TrainedAdapter`; this is the one whose
"adapter" is the whole transformer, so optimizer, clipping, EMA, checkpoints and exact resume are
the LoRA code paths. What differs:

- **What trains.** Every parameter of the transformer: SimpleTuner's ``model_type full`` makes the
  whole transformer trainable (our reading of it; reference/simpletuner.md names no exception), and
  no source we have names a part to keep frozen. So nothing stays frozen for either family:
  embedders, norms, adaLN modulation and the final layer train too.
  A family may name exceptions (fnmatch patterns) in ``full_finetune_frozen``; none does today. The
  VAE and the text encoders are never trained.
- **Precision.** With an optimizer that updates bf16 weights without losing small steps
  (:func:`.lowmem_optim.keeps_low_precision_weights`: ``adamw_bf16`` and torchao's by stochastic
  rounding, optimi's by Kahan summation) the weights stay in the dtype they were loaded in (bf16 on
  a GPU); with any other optimizer they become fp32 master weights (autocast still computes in
  bf16), as LoRA parameters are.
- **Memory.** :meth:`state_dict` returns the live weights (no copy); checkpoints write them as
  shards, one at a time (:mod:`.shards`), and resume copies them back one tensor at a time.
- **Outputs.** A diffusers pipeline folder (``transformer/`` written here, the other components
  hard-linked or copied from the base model) and one ComfyUI diffusion-model file in ComfyUI's
  naming (:mod:`.comfy_model`). EMA weights are exported from the EMA's shadow tensors directly,
  never swapped into the model (which would back up a copy of every weight).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .comfy_model import TO_COMFY
from .lowmem_optim import keeps_low_precision_weights
from .shards import DEFAULT_SHARD_BYTES, stream_safetensors, write_sharded

if TYPE_CHECKING:
    from ..families.base import ModelFamily
    from ..lora.export import LoraFiles
    from ..spec import TrainSpec

log = logging.getLogger(__name__)

WEIGHTS_STEM = "diffusion_pytorch_model"  # diffusers' file name for a transformer's weights
_LORA_ONLY_KEYS = ("ss_network_dim", "ss_network_alpha", ".rank", ".alpha", ".target_modules")
SHARD_BYTES = DEFAULT_SHARD_BYTES  # checkpoint and export shard size (tests lower it to get several shards)


class FullFinetune:
    """Trains all of ``transformer``'s weights (kind ``full``); see the module docstring."""

    kind = "full"
    rank = 0
    alpha = 0.0

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: ModelFamily,
        *,
        master_fp32: bool,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.transformer = transformer
        self.family = family
        self.shard_bytes = shard_bytes
        first = next(transformer.parameters())
        self.export_dtype = first.dtype  # what the base was loaded in: the files keep it
        frozen = list(family.full_finetune_frozen)
        transformer.requires_grad_(False)
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.frozen_names: list[str] = []
        for name, p in transformer.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in frozen):
                self.frozen_names.append(name)
                continue
            if master_fp32:
                p.data = p.data.to(torch.float32)
            p.requires_grad_(True)
            self.names.append(name)
            self.params.append(p)
        if not self.params:
            raise ConfigError(f"model_type 'full': no weight of the {family.name} transformer is trainable")

    # ------------------------------------------------------------------ interface
    @property
    def target_modules(self) -> list[str]:
        return ["*"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live trainable weights by name: not copies (the caller writes them and lets go)."""
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Copy ``sd`` into the weights one tensor at a time (``sd`` may read lazily from shards)."""
        missing = [n for n in self.names if n not in sd]
        known = set(self.names)
        unexpected = [k for k in sd if k not in known]
        if missing or unexpected:
            raise ConfigError(
                f"{source} does not hold this transformer's weights: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}",
                "resume from a checkpoint of a full fine-tune of the same model",
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                t = sd[n]
                if tuple(t.shape) != tuple(p.shape):
                    raise ConfigError(f"{source}: {n} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
                p.copy_(t)

    def load_file(self, path: str | Path) -> None:
        raise ConfigError(
            "init_lora does not apply to model_type 'full'",
            "remove init_lora; to continue a fine-tune, point pretrained_model_name_or_path at its diffusers folder",
        )

    def metadata(self) -> dict[str, str]:
        count = sum(p.numel() for p in self.params)
        return {"adapter_type": "full", "trained_parameters": str(count)}

    def at_strength(self, multiplier: float) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def save(
        self,
        folder: Path,
        name: str,
        metadata: Mapping[str, str],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> LoraFiles:
        """Write ``folder/<name>/`` (diffusers pipeline) and ``folder/<name>_comfyui.safetensors``.

        ``weights`` (by parameter name, e.g. the EMA's shadow) replaces the live trainable weights;
        the transformer's other tensors (frozen ones, buffers saved by diffusers) come from the model.
        """
        from ..lora.export import LoraFiles

        # a model file, not a LoRA: no rank/alpha keys that LoRA browsers would show
        metadata = {k: v for k, v in metadata.items() if not k.endswith(_LORA_ONLY_KEYS)}
        tensors = self.export_tensors(weights)
        pipeline = folder / name
        self.write_diffusers(pipeline, tensors)
        comfy = folder / f"{name}_comfyui.safetensors"
        self.write_comfyui(comfy, tensors, metadata)
        return LoraFiles(diffusers=pipeline, comfyui=comfy)

    # ------------------------------------------------------------------ outputs
    def export_tensors(self, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformer's state dict (no copies), with ``weights`` in place of the trained ones."""
        sd = {k: v.detach() for k, v in self.transformer.state_dict().items()}
        if weights is not None:
            for n in self.names:
                sd[n] = weights[n]
        return sd

    def write_diffusers(self, pipeline: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        """A pipeline folder ``from_pretrained`` loads: the new transformer plus the base's other parts."""
        if pipeline.exists() and not (pipeline / "transformer" / "config.json").is_file():
            raise ConfigError(
                f"{pipeline} exists and is not a model folder written by a fine-tune; it is not replaced",
                "choose another output_name, or move that folder away",
            )
        tmp = pipeline.with_name(f".tmp-{pipeline.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        base = _local_base(self.family)
        if base is not None:
            _link_tree(base, tmp, skip={"transformer"})
        else:  # the transformer alone still loads with from_pretrained(folder, subfolder="transformer")
            log.warning("the base model's folder was not found on disk: %s holds the transformer only", pipeline)
        self.transformer.save_config(tmp / "transformer")
        write_sharded(tmp / "transformer", WEIGHTS_STEM, tensors, max_bytes=self.shard_bytes, dtype=self.export_dtype)
        if pipeline.exists():
            shutil.rmtree(pipeline)
        os.replace(tmp, pipeline)

    def write_comfyui(self, path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """One file in ComfyUI's naming (Load Diffusion Model reads a single file, not shards)."""
        convert = TO_COMFY.get(self.family.name)
        if convert is None:
            raise ConfigError(
                f"no ComfyUI naming is known for {self.family.name}; only the diffusers folder is written"
            )
        comfy = convert(tensors)
        shape = getattr(comfy, "shape", None)
        shapes = {k: (shape(k) if shape else tuple(comfy[k].shape)) for k in comfy}
        # streamed: each tensor (a fused qkv is made by concatenation) exists only while it is written
        stream_safetensors(path, shapes, comfy.__getitem__, self.export_dtype, metadata)


def _local_base(family: ModelFamily) -> Path | None:
    """The base model's diffusers folder on disk (a local folder, or the Hugging Face cache snapshot)."""
    local = Path(family.source).expanduser()
    if (local / "model_index.json").is_file():
        return local
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(family.source, revision=family.spec.model.revision, local_files_only=True))
    except Exception:
        return None
    return path if (path / "model_index.json").is_file() else None


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (or, across file systems, copy) every file of ``src`` into ``dst`` except top-level ``skip``."""
    for path in _files(src, skip):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # HF cache snapshots hold symlinks into blobs/
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def _files(src: Path, skip: set[str]) -> Iterator[Path]:
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from (p for p in sorted(entry.rglob("*")) if p.is_file())
        elif entry.is_file():
            yield entry


def build_full_finetune(spec: TrainSpec, family: ModelFamily, transformer: torch.nn.Module) -> FullFinetune:
    """The full fine-tune the spec asks for (its refusals ran in resolve_spec, before the model loaded)."""
    master_fp32 = not keeps_low_precision_weights(spec.optimizer.optimizer)
    return FullFinetune(transformer, family, master_fp32=master_fp32, shard_bytes=SHARD_BYTES)
