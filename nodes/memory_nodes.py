"""Configure Offload/Quant: the ``memory`` section of the TrainSpec (what fits a model on a GPU).

Its inputs are MemorySpec's fields under their own names (SimpleTuner's keys), so this node and an
imported config mean the same thing by each option. The section is checked here with the engine's
own rules (``check_memory_spec`` on ComfyUI's device: a torchao precision without torchao, group
offload together with model CPU offload, CUDA streams without CUDA...), so a bad combination fails
on this node with the engine's message; what the engine would ignore or turn off (streams under
gradient checkpointing, group options without group offload) is listed on the node. Train LoRA and
Cache Embeds check the whole spec again (a quantised base with full fine-tuning, say).
"""

from __future__ import annotations

from typing import get_args

from comfy_api.latest import io, ui

from ..trainer_core.spec import MemorySpec, build_spec
from . import comfy_bridge as bridge
from .run_spec import checked
from .sockets import CATEGORY_SETTINGS, TunerMemory


def choices(field: str) -> list[str]:
    """The values a Literal field of MemorySpec allows, in the spec's order."""
    return [str(v) for v in get_args(MemorySpec.model_fields[field].annotation)]


def default(field: str) -> object:
    return MemorySpec.model_fields[field].default


def memory_warnings(section: dict) -> list[str]:
    """The engine's check of a memory section on ComfyUI's device: raises on refusals, returns warnings."""
    from ..trainer_core.memory.check import check_memory_spec

    return check_memory_spec(build_spec({"memory": section}, source="memory settings"), bridge.torch_device_name())


def describe(section: dict, warnings: list[str]) -> str:
    """What the node shows: the options that differ from the defaults, then the engine's warnings."""
    changed = [f"{key}: {value}" for key, value in section.items() if value != default(key)]
    lines = changed or ["defaults: nothing quantised or offloaded"]
    return "\n".join(lines + [f"warning: {w}" for w in warnings])


PRECISION_TIP = (
    " int8-quanto is the safe choice (about half the memory of bf16); int4-quanto saves the most and costs "
    "the most quality; fp8 halves memory like int8; the *-torchao variants need the torchao package "
    "(pip install torchao). no_change keeps the model's own dtype."
)


class TunerConfigureOffloadQuant(io.ComfyNode):
    """Configure Offload/Quant: quantised base weights, group offload and VAE memory options."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        precisions = choices("base_model_precision")
        return io.Schema(
            node_id="TunerConfigureOffloadQuant",
            display_name="Configure Offload/Quant",
            category=CATEGORY_SETTINGS,
            description="Fit a large model in less GPU memory: quantise the frozen base weights, keep transformer "
            "blocks in CPU memory until they run, and encode images and videos in pieces. Connect it to Train "
            "LoRA and to Cache Embeds.",
            inputs=[
                io.Combo.Input(
                    "base_model_precision",
                    options=precisions,
                    default=str(default("base_model_precision")),
                    tooltip="Quantise the frozen base transformer; the LoRA itself still trains in full precision."
                    + PRECISION_TIP,
                ),
                io.Combo.Input(
                    "text_encoder_1_precision",
                    options=precisions,
                    default=str(default("text_encoder_1_precision")),
                    tooltip="Quantise the first text encoder while captions are cached (Kandinsky 5: Qwen2.5-VL; "
                    "Lumina 2: Gemma 2). Its embeddings then differ from the full-precision ones ComfyUI uses when "
                    "sampling (they are cached under their own key); discouraged for Kandinsky 5.",
                ),
                io.Combo.Input(
                    "text_encoder_2_precision",
                    options=precisions,
                    default=str(default("text_encoder_2_precision")),
                    tooltip="Quantise the second text encoder while captions are cached (Kandinsky 5: CLIP-L; "
                    "Lumina 2 has none).",
                ),
                io.Combo.Input(
                    "quantize_via",
                    options=choices("quantize_via"),
                    default=str(default("quantize_via")),
                    tooltip="cpu: quantise before moving to the GPU, so the full-precision weights never occupy GPU "
                    "memory (slower to start; what makes 16 GB cards work). accelerator: move first and quantise on "
                    "the GPU (faster, needs room for the unquantised model).",
                ),
                io.Boolean.Input(
                    "enable_group_offload",
                    default=bool(default("enable_group_offload")),
                    tooltip="Keep the transformer's blocks in CPU memory and move each group to the GPU only while "
                    "it runs: much less GPU memory, slower steps. Cannot be combined with enable_model_cpu_offload.",
                ),
                io.Combo.Input(
                    "group_offload_type",
                    options=choices("group_offload_type"),
                    default=str(default("group_offload_type")),
                    tooltip="block_level: groups of whole transformer blocks move together (faster); leaf_level: "
                    "every layer on its own (least memory, slowest).",
                ),
                io.Int.Input(
                    "group_offload_blocks_per_group",
                    default=int(default("group_offload_blocks_per_group")),
                    min=1,
                    max=64,
                    tooltip="block_level: how many blocks move to the GPU together; more is faster and needs more "
                    "memory. Ignored with leaf_level.",
                ),
                io.Boolean.Input(
                    "group_offload_use_stream",
                    default=bool(default("group_offload_use_stream")),
                    tooltip="Fetch the next group on a separate CUDA stream while the current one computes (faster; "
                    "CUDA GPUs only, refused otherwise). Turned off with a warning while gradient checkpointing is "
                    "on, which is the default: recomputation runs the blocks backwards.",
                ),
                io.Boolean.Input(
                    "group_offload_text_encoder",
                    default=bool(default("group_offload_text_encoder")),
                    tooltip="Also group-offload the text encoders while captions are cached (needs "
                    "enable_group_offload).",
                ),
                io.Boolean.Input(
                    "group_offload_vae",
                    default=bool(default("group_offload_vae")),
                    tooltip="Also group-offload the VAE while images and videos are cached (needs "
                    "enable_group_offload).",
                ),
                io.Boolean.Input(
                    "enable_model_cpu_offload",
                    default=bool(default("enable_model_cpu_offload")),
                    tooltip="Validation renders only: the transformer and the VAE take turns on the GPU (the "
                    "transformer while denoising, the VAE while encoding and decoding), as SimpleTuner does for its "
                    "validation pipeline. Less GPU memory while validating, slower validations (the transformer "
                    "moves to the CPU and back for every render); training is unchanged, and so is everything on a "
                    "CPU. Cannot be combined with enable_group_offload.",
                ),
                io.Boolean.Input(
                    "offload_during_startup",
                    default=bool(default("offload_during_startup")),
                    tooltip="While caching, move any encoder still in memory after its stage to the CPU and report "
                    "memory per stage (text encoders and the VAE are never loaded together either way).",
                ),
                io.Boolean.Input(
                    "vae_enable_tiling",
                    default=bool(default("vae_enable_tiling")),
                    tooltip="Encode large images and videos in overlapping tiles: less memory while caching; the "
                    "latents differ slightly at tile seams, so they are cached under their own key.",
                ),
                io.Boolean.Input(
                    "vae_enable_slicing",
                    default=bool(default("vae_enable_slicing")),
                    tooltip="Encode a batch one image or clip at a time: less memory while caching, same latents.",
                ),
                io.Boolean.Input(
                    "vae_enable_patch_conv",
                    default=bool(default("vae_enable_patch_conv")),
                    tooltip="Kandinsky 5 video: run the video VAE's 3D convolutions in slabs, the largest memory "
                    "peak when caching long or large clips; same latents. Combines with tiling.",
                ),
                io.Boolean.Input(
                    "vae_cache_ondemand",
                    default=bool(default("vae_cache_ondemand")),
                    tooltip="No encoding pass before training: each image or clip is encoded the first time it is "
                    "drawn and written to the latent cache. Training starts sooner; the VAE stays loaded while "
                    "training and first-epoch steps are slower. Same latents, same run.",
                ),
                io.Boolean.Input(
                    "vae_cache_disable",
                    default=bool(default("vae_cache_disable")),
                    tooltip="Encode at every draw and write no latent to disk (for datasets too large for the "
                    "disk). Every step pays for its encodes and the VAE stays loaded. Same latents, same run.",
                ),
            ],
            outputs=[TunerMemory.Output("memory", tooltip="Memory settings for Train LoRA and Cache Embeds.")],
        )

    @classmethod
    def execute(
        cls,
        base_model_precision: str,
        text_encoder_1_precision: str,
        text_encoder_2_precision: str,
        quantize_via: str,
        enable_group_offload: bool,
        group_offload_type: str,
        group_offload_blocks_per_group: int,
        group_offload_use_stream: bool,
        group_offload_text_encoder: bool,
        group_offload_vae: bool,
        enable_model_cpu_offload: bool,
        offload_during_startup: bool,
        vae_enable_tiling: bool,
        vae_enable_slicing: bool,
        vae_enable_patch_conv: bool,
        vae_cache_ondemand: bool,
        vae_cache_disable: bool,
    ) -> io.NodeOutput:
        values = dict(locals())
        section = checked("memory", {key: values[key] for key in MemorySpec.model_fields})
        warnings = memory_warnings(section)
        return io.NodeOutput({"memory": section}, ui=ui.PreviewText(describe(section, warnings)))


NODES = [TunerConfigureOffloadQuant]
