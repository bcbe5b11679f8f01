"""The model card (``README.md``) of a published run.

A Hub model card is YAML metadata between ``---`` lines, then Markdown. The metadata here is what
the Hub indexes and shows: ``base_model`` (the model trained on, so the repo lists as its adapter
or fine-tune), ``tags`` (the family, ``lora``/``lycoris`` or ``full``, ``text-to-image``,
``comfyui``, SimpleTuner's ``not-for-all-audiences``/``safe-for-work`` pair), ``library_name``,
``instance_prompt`` (the trigger words the datasets prepend), ``widget`` entries (each validation
sample with its prompt, shown as the repo's gallery) and a ``comfyui_tuner`` block with the
training settings (rank, alpha, learning rate, steps, optimizer, resolution...). The text repeats
the settings for people and says how to load each file.

Everything is plain data from the resolved spec and the run's outputs; nothing here talks to the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import TrainSpec

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


@dataclass(frozen=True)
class Sample:
    """One validation sample as published: its path in the repository and the prompt it rendered."""

    path_in_repo: str
    prompt: str | None


@dataclass
class CardFacts:
    """What the card says, gathered once (:func:`card_facts`) so the card is a pure function of it."""

    repo_id: str
    family: str
    flavour: str
    base_model: str
    model_type: str  # "lora" or "full"
    adapter: str  # "lora", "dora", "lycoris-<algo>" or "full"
    settings: dict[str, Any]
    trigger: list[str] = field(default_factory=list)
    validation_prompt: str | None = None
    negative_prompt: str | None = None
    samples: list[Sample] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # what -> path in repo ("comfyui", "diffusers")
    video: bool = False
    safe_for_work: bool = False
    note: str | None = None


def card_facts(
    spec: TrainSpec,
    *,
    base_model: str,
    steps: int,
    samples: list[Sample],
    files: dict[str, str],
) -> CardFacts:
    """The card's facts from the (resolved) spec of the run and its published files."""
    lora, o, t = spec.lora, spec.optimizer, spec.training
    full = spec.model.model_type == "full"
    if full:
        adapter = "full"
    elif lora.lora_type == "lycoris":
        adapter = f"lycoris-{lora.lycoris.algo if lora.lycoris else 'lokr'}"
    else:
        adapter = "dora" if lora.use_dora else "lora"
    settings: dict[str, Any] = {}
    if not full:
        settings["rank"] = lora.lora_rank
        settings["alpha"] = lora.alpha
        if lora.lora_type == "lycoris" and lora.lycoris is not None:
            settings["lycoris_algo"] = lora.lycoris.algo
            if lora.lycoris.linear_dim:
                settings["rank"] = lora.lycoris.linear_dim
            if lora.lycoris.linear_alpha:
                settings["alpha"] = lora.lycoris.linear_alpha
    settings.update(
        learning_rate=o.learning_rate,
        lr_scheduler=o.lr_scheduler,
        optimizer=o.optimizer,
        steps=steps,
        train_batch_size=t.train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        seed=t.seed,
        resolution=sorted({_resolution(d.resolution, d.resolution_type) for d in spec.training_datasets}),
    )
    if t.use_ema:
        settings["ema_decay"] = t.ema_decay
    trigger = sorted({d.instance_prompt for d in spec.training_datasets if d.instance_prompt})
    return CardFacts(
        repo_id=spec.export.hub_model_id or "",
        family=spec.model.model_family,
        flavour=spec.model.model_flavour or "",
        base_model=base_model,
        model_type=spec.model.model_type,
        adapter=adapter,
        settings=settings,
        trigger=trigger,
        validation_prompt=spec.validation.validation_prompt,
        negative_prompt=spec.validation.validation_negative_prompt,
        samples=samples,
        files=files,
        video=bool(spec.video_datasets),
        safe_for_work=spec.export.model_card_safe_for_work,
        note=spec.export.model_card_note,
    )


def _resolution(value: float | None, kind: str | None) -> str:
    if value is None:
        return "family default"
    number = f"{value:g}"
    return f"{number} ({kind})" if kind else number


def card_metadata(f: CardFacts) -> dict[str, Any]:
    """The YAML block: keys the Hub knows (ModelCardData's), plus ``comfyui_tuner`` settings."""
    if f.model_type == "full":
        kind_tags = ["full"]
    else:  # template:sd-lora: the Hub's LoRA widget template (SimpleTuner tags it too)
        kind_tags = ["lora", *(["lycoris"] if f.adapter.startswith("lycoris") else []), "template:sd-lora"]
    pipeline = "text-to-video" if f.video else "text-to-image"
    meta: dict[str, Any] = {
        "base_model": f.base_model,
        "library_name": "diffusers",
        "pipeline_tag": pipeline,
        "tags": [
            f.family,
            pipeline,
            "diffusers",
            *kind_tags,
            "comfyui",
            "comfyui-tuner",
            "safe-for-work" if f.safe_for_work else "not-for-all-audiences",
        ],
    }
    if f.trigger:
        meta["instance_prompt"] = ", ".join(f.trigger)
    widgets = []
    for s in f.samples:
        if s.path_in_repo.endswith(VIDEO_SUFFIXES):
            continue  # a video's frame strip (a PNG beside it) is its widget
        entry: dict[str, Any] = {"text": s.prompt or "", "output": {"url": s.path_in_repo}}
        if f.negative_prompt:
            entry["parameters"] = {"negative_prompt": f.negative_prompt}
        widgets.append(entry)
    if widgets:
        meta["widget"] = widgets
    meta["comfyui_tuner"] = {
        "family": f.family,
        "flavour": f.flavour,
        "model_type": f.model_type,
        "adapter": f.adapter,
        **f.settings,
    }
    return meta


def render_card(f: CardFacts) -> str:
    """The whole ``README.md``: metadata (through huggingface_hub's own YAML writer) and text."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(**card_metadata(f))
    names = {"lora": "LoRA", "dora": "DoRA"}
    what = "a full fine-tune" if f.model_type == "full" else f"a {names.get(f.adapter, f.adapter)} adapter"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {f.repo_id}",
        "",
        f"This is {what} of [{f.base_model}](https://huggingface.co/{f.base_model}) ({f.family}"
        + (f", flavour {f.flavour}" if f.flavour else "")
        + "), trained with comfyui-tuner (SimpleTuner-compatible settings).",
        "",
    ]
    if f.note:
        lines += [f.note, ""]
    if f.trigger:
        lines += ["## Trigger words", "", "Use " + ", ".join(f"`{t}`" for t in f.trigger) + " in the prompt.", ""]
    if f.validation_prompt:
        lines += ["The main validation prompt was:", "", "```", f.validation_prompt, "```", ""]
    if f.samples:
        lines += ["## Samples", "", "<Gallery />", ""]
        for s in f.samples:
            label = (s.prompt or "unconditional").replace("]", ")").replace("[", "(")
            if s.path_in_repo.endswith(VIDEO_SUFFIXES):
                lines.append(f"- [{label}]({s.path_in_repo}) (video)")
            else:
                lines.append(f"![{label}]({s.path_in_repo})")
        lines.append("")
    lines += ["## Files", ""]
    if "comfyui" in f.files:
        where = "`models/diffusion_models`" if f.model_type == "full" else "`models/loras`"
        loader = "Load Diffusion Model" if f.model_type == "full" else "LoraLoaderModelOnly"
        lines.append(f"- `{f.files['comfyui']}`: ComfyUI's own key names; put it in {where} and load it with {loader}.")
    if "diffusers" in f.files:
        if f.model_type == "full":
            lines.append("- the repository root: a diffusers pipeline (`DiffusionPipeline.from_pretrained`).")
        elif f.adapter.startswith("lycoris"):
            lines.append(f"- `{f.files['diffusers']}`: LyCORIS's own format (`lycoris.create_lycoris_from_weights`).")
        else:
            lines.append(
                f"- `{f.files['diffusers']}`: diffusers/PEFT format, "
                f'`pipe.load_lora_weights("{f.repo_id}", weight_name="{f.files["diffusers"]}")`.'
            )
    lines += ["", "## Training settings", ""]
    for key, value in f.settings.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"- {key}: `{shown}`")
    lines.append("")
    return "\n".join(lines)


def sample_prompt(path: Path, prompts: dict[str, str]) -> str | None:
    """The prompt a validation file rendered: the engine names files ``<prompt name>-<W>x<H>``."""
    stem = path.stem.removesuffix("-frames")
    name = stem.rsplit("-", 1)[0] if "-" in stem else stem
    for key, text in prompts.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)[:60]
        if safe == name:
            return text
    return None
