"""TrainSpec: the one typed description of a training run.

Every front door (ComfyUI nodes, the command line, SimpleTuner config files) builds a
:class:`TrainSpec`; the engine only ever reads one. Field names are SimpleTuner's keys so that
importing and exporting SimpleTuner configs is a renaming-free mapping (see ``simpletuner.py``).

Fields whose sensible default depends on the model family (learning rate, guidance, resolution,
shift...) default to ``None`` here and are filled by :meth:`TrainSpec.resolved`, which asks the
family. A spec is validated on construction: invalid values fail with the option name and the
values allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

OPTIMIZERS = (
    "adamw",
    "adamw_bf16",
    "lion",
    "optimi-stableadamw",
    "optimi-lion",
    "prodigy",
    # low-memory optimizers (trainer_core/train/lowmem_optim.py), SimpleTuner's names
    "ao-adamw8bit",
    "ao-adamw4bit",
    "ao-adamfp8",
    "ao-adamwfp8",
    "optimi-adamw",
    "optimi-adam",
    "optimi-radam",
    "optimi-ranger",
    "bnb-adamw8bit",
    "bnb-lion8bit",
)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


class _Section(BaseModel):
    """Common config: unknown keys are errors (the importer warns before they get here)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSpec(_Section):
    """Which model to train and where its weights are."""

    model_family: str = "lumina2"
    model_flavour: str | None = None
    pretrained_model_name_or_path: str | None = Field(
        None, description="Hugging Face repo id or local diffusers folder; overrides the flavour's default."
    )
    revision: str | None = None
    model_type: Literal["lora", "full"] = "lora"
    system_prompt: str | None = Field(
        None, description="Lumina 2: text put before every caption; None uses the flavour's default."
    )
    tokenizer_max_length: int | None = Field(None, ge=8, le=4096)


LYCORIS_ALGOS = ("lokr", "loha", "locon", "full")


class LycorisPreset(_Section):
    """LyCORIS's ``apply_preset``: which modules get an adapter, and per-module algorithm settings.

    ``target_module`` lists module *class names* (``Kandinsky5Attention``: every Linear inside);
    ``target_name`` lists module names or patterns (regular expressions matched from the start, or
    shell patterns with ``use_fnmatch``). ``module_algo_map`` / ``name_algo_map`` override the
    algorithm's settings (``algo``, ``factor``, ``linear_dim``...) per class / per name.
    """

    target_module: list[str] | None = None
    target_name: list[str] | None = None
    module_algo_map: dict[str, dict[str, Any]] = Field(default_factory=dict)
    name_algo_map: dict[str, dict[str, Any]] = Field(default_factory=dict)
    use_fnmatch: bool = False
    exclude_name: list[str] = Field(default_factory=list)
    enable_conv: bool = True


class LycorisSpec(_Section):
    """A LyCORIS adapter: the content of SimpleTuner's ``lycoris_config`` JSON file.

    ``linear_dim`` / ``linear_alpha`` default to ``lora_rank`` / ``lora_alpha``. ``dora_wd`` adds
    DoRA's weight decomposition (LoCon, LoHa and LoKr support it). ``bypass_mode`` computes the
    adapter beside the frozen layer instead of merging into its weight, which quantised bases need;
    None turns it on exactly when the base is quantised.
    """

    algo: Literal["lokr", "loha", "locon", "full"] = "lokr"
    multiplier: float = Field(1.0, gt=0)
    linear_dim: int | None = Field(None, ge=1)
    linear_alpha: float | None = Field(None, gt=0)
    conv_dim: int | None = Field(None, ge=1, description="Accepted from SimpleTuner configs; no family adapts convs.")
    conv_alpha: float | None = Field(None, gt=0)
    factor: int = Field(-1, description="LoKr: the Kronecker factor; -1 picks the most balanced split.")
    full_matrix: bool = False
    decompose_both: bool = False
    unbalanced_factorization: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    rs_lora: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dora_wd: bool = False
    wd_on_output: bool = True
    bypass_mode: bool | None = None
    init_lokr_norm: float | None = Field(None, gt=0)
    apply_preset: LycorisPreset | None = None


def read_lycoris_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in a ``lycoris_config`` file; a missing or broken file names itself."""
    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"lycoris_config file {file} does not exist", "give the path of the LyCORIS JSON file"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"lycoris_config file {file} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"lycoris_config file {file} must hold a JSON object of LyCORIS settings")
    return raw


class LoraSpec(_Section):
    """The adapter that is trained: a PEFT LoRA (optionally DoRA) or a LyCORIS adapter."""

    lora_type: Literal["standard", "lycoris"] = "standard"
    use_dora: bool = Field(
        False, description="DoRA: a LoRA with a learned per-row magnitude (for LyCORIS: dora_wd)."
    )
    lycoris_config: str | None = Field(
        None, description="A LyCORIS JSON file (SimpleTuner's key); read into 'lycoris' when the spec is built."
    )
    lycoris: LycorisSpec | None = Field(None, description="The LyCORIS settings (lora_type 'lycoris').")
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0, description="None means equal to lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    peft_lora_target_modules: list[str] | None = Field(
        None, description="Module name suffixes; None uses the family's default targets."
    )
    lora_target_preset: str | None = Field(
        None, description="A named target set of the family (e.g. 'attention', 'attention+ffn')."
    )
    init_lora: str | None = Field(None, description="A LoRA file (diffusers or ComfyUI format) to start from.")

    @model_validator(mode="before")
    @classmethod
    def _read_lycoris_config(cls, data: Any) -> Any:
        """Read ``lycoris_config`` into ``lycoris``, so the file's content is part of the run's identity."""
        if isinstance(data, dict) and data.get("lycoris_config") and data.get("lycoris") is None:
            data = {**data, "lycoris": read_lycoris_config(data["lycoris_config"])}
        return data

    @model_validator(mode="after")
    def _lycoris_settings_fit_the_type(self) -> LoraSpec:
        if self.lora_type == "lycoris" and self.lycoris is None:
            raise ValueError("lora_type 'lycoris' needs lycoris_config (a LyCORIS JSON file) or lycoris settings")
        if self.lora_type == "standard" and self.lycoris is not None:
            raise ValueError("LyCORIS settings are given but lora_type is 'standard'; set lora_type 'lycoris'")
        return self

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def adapter_kind(self) -> str:
        """What is trained, in one word: lora, dora, or the LyCORIS algorithm (lokr, loha, locon, full)."""
        if self.lora_type == "lycoris" and self.lycoris is not None:
            return self.lycoris.algo
        return "dora" if self.use_dora else "lora"


class OptimizerSpec(_Section):
    optimizer: str = "adamw_bf16"
    learning_rate: float | None = Field(None, gt=0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1)
    lr_power: float = Field(1.0, gt=0)
    lr_end: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping.")
    grad_clip_method: Literal["norm", "value"] = "norm"

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; allowed: {', '.join(OPTIMIZERS)}")
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {v!r}; allowed: {', '.join(LR_SCHEDULERS)}")
        return v


class TrainingSpec(_Section):
    """Loop length, precision, noise schedule and loss."""

    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=1)
    num_train_epochs: int | None = Field(None, ge=1)
    seed: int = 42
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    base_model_default_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    caption_dropout_probability: float = Field(0.0, ge=0.0, le=1.0)
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    huber_c: float = Field(0.1, gt=0)
    flow_schedule_shift: float | None = Field(
        None, ge=0, description="Static shift of the sampled noise levels; None uses the family default."
    )
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = Field(1.0, gt=0)
    flow_use_uniform_schedule: bool = False
    use_ema: bool = False
    ema_decay: float = Field(0.995, gt=0, lt=1)
    ema_device: Literal["cpu", "accelerator"] = Field(
        "cpu",
        description="Where the EMA's fp32 shadow weights live between updates: 'cpu' (no VRAM; SimpleTuner's "
        "default) or 'accelerator' (the training device: fastest, costs 4 bytes per trained parameter).",
    )
    ema_cpu_only: bool = Field(
        False,
        description="With ema_device 'cpu', update the shadow on the CPU too instead of moving it to the "
        "accelerator for each update (no transfers, no VRAM at all); no effect with 'accelerator'.",
    )
    ema_update_interval: int = Field(
        1, ge=1, description="Update the EMA every N optimizer steps (at steps N, 2N, ...); 1 = every step."
    )
    vae_batch_size: int = Field(4, ge=1, description="Images per VAE call while caching latents.")
    aspect_bucket_alignment: int | None = Field(None, ge=8)
    disable_bucket_pruning: bool = False
    dataloader_seed_offset: int = 0

    @field_validator("ema_update_interval", mode="before")
    @classmethod
    def _unset_interval_is_every_step(cls, v: object) -> object:
        return 1 if v is None else v  # SimpleTuner's null (its default) means "every step"


PRECISIONS = ("no_change", "int8-quanto", "fp8-quanto", "int4-quanto", "int8-torchao", "fp8-torchao")


class MemorySpec(_Section):
    """Quantised base weights, offloading and start-up sequencing (what fits a model on a GPU)."""

    base_model_precision: Literal[PRECISIONS] = "no_change"  # type: ignore[valid-type]
    text_encoder_1_precision: Literal[PRECISIONS] = "no_change"  # type: ignore[valid-type]
    text_encoder_2_precision: Literal[PRECISIONS] = "no_change"  # type: ignore[valid-type]
    quantize_via: Literal["cpu", "accelerator"] = "cpu"
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)
    group_offload_use_stream: bool = False
    group_offload_text_encoder: bool = False
    group_offload_vae: bool = False
    enable_model_cpu_offload: bool = False
    offload_during_startup: bool = False
    vae_enable_tiling: bool = False
    vae_enable_slicing: bool = False
    vae_enable_patch_conv: bool = False
    vae_cache_ondemand: bool = Field(
        False,
        description="No latent pre-pass: each image or clip is encoded the first time training draws it, "
        "and written to the latent cache (the VAE stays loaded while training).",
    )
    vae_cache_disable: bool = Field(
        False,
        description="Encode latents on the fly at every draw and write none to disk (implies on-demand; "
        "the VAE stays loaded while training).",
    )

    @property
    def latents_on_the_fly(self) -> bool:
        """Whether latents are encoded while training instead of in a pre-pass."""
        return self.vae_cache_ondemand or self.vae_cache_disable


# Memory options that move weights around (or make the same latents at another time) but do not
# change what is learnt: a resumed run may change them (train/run_definition.py), and the nodes leave
# them out of a run folder's name.
PLACEMENT_ONLY_MEMORY = (
    "quantize_via",
    "enable_group_offload",
    "group_offload_type",
    "group_offload_blocks_per_group",
    "group_offload_use_stream",
    "group_offload_text_encoder",
    "group_offload_vae",
    "enable_model_cpu_offload",
    "offload_during_startup",
    "vae_enable_tiling",
    "vae_enable_slicing",
    "vae_enable_patch_conv",
    "vae_cache_ondemand",
    "vae_cache_disable",
)


class RoutingSpec(_Section):
    """TREAD token routing (``tread_config``): tokens skip middle blocks while training."""

    tread_config: dict[str, Any] | None = Field(
        None, description='{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}'
    )


class CrepaSpec(_Section):
    """CREPA (``crepa_*``, SimpleTuner's keys and defaults): align a block's hidden states with DINOv2
    features of the clip's frames and their neighbours (trainer_core/routing/crepa.py). Kandinsky 5 video;
    Kandinsky 5 image with the encoder-free ``backbone`` teacher only."""

    crepa_enabled: bool = False
    crepa_block_index: int = Field(8, ge=0, description="visual block whose output is aligned (0-based)")
    crepa_lambda: float = Field(0.5, ge=0, description="weight of the CREPA term added to the flow loss")
    crepa_adjacent_distance: int = Field(1, ge=0, description="neighbour frames at distance d (0: the frame only)")
    crepa_adjacent_tau: float = Field(1.0, gt=0, description="neighbour weight exp(-d/tau)")
    crepa_cumulative_neighbors: bool = Field(False, description="every distance 1..d instead of exactly d")
    crepa_normalize_neighbour_sum: bool = Field(False, description="divide each frame's sum by its weights' sum")
    crepa_normalize_by_frames: bool = Field(True, description="divide a clip's sum over frames by the frame count")
    crepa_spatial_align: bool = Field(True, description="interpolate token grids that differ (off: pool both)")
    crepa_feature_source: Literal["encoder", "backbone"] = Field(
        "encoder", description="teacher: DINOv2 on the decoded frames, or a deeper block of the model itself"
    )
    crepa_teacher_block_index: int | None = Field(
        None, ge=0, description="backbone teacher block (default: crepa_block_index, as SimpleTuner)"
    )
    crepa_encoder: str = Field(
        "dinov2_vitg14", min_length=1, description="dinov2_vits14/vitb14/vitl14/vitg14, a repo id or a local folder"
    )
    crepa_encoder_image_size: int = Field(518, ge=14, description="square size frames are resized to (224 for vits14)")
    crepa_encoder_frames_batch_size: int = Field(-1, description="frames per DINOv2 call (<= 0: all at once)")
    crepa_drop_vae_encoder: bool = Field(False, description="the VAE CREPA decodes with keeps no encoder")
    crepa_scheduler: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    crepa_warmup_steps: int = Field(0, ge=0)
    crepa_decay_steps: int = Field(0, ge=0, description="0: decay over the whole run")
    crepa_lambda_end: float = Field(0.0, ge=0)
    crepa_power: float = Field(1.0, gt=0)
    crepa_cutoff_step: int = Field(0, ge=0, description="0: no step cutoff")
    crepa_similarity_threshold: float | None = Field(None, description="cut CREPA off when the score's EMA reaches it")
    crepa_similarity_ema_decay: float = Field(0.99, ge=0, le=1)
    crepa_threshold_mode: Literal["permanent", "recoverable"] = "permanent"
    crepa_teacher_cache: bool = Field(
        True, description="cache the teacher features on disk beside the latents (comfyui-tuner only)"
    )


ROLLOUT_SAMPLERS = ("euler",)
ROLLOUT_SAMPLERS_REFUSED = ("unipc", "dpm")  # SimpleTuner's other solvers (for its eps / v-prediction models)


class ScheduledSamplingSpec(_Section):
    """Scheduled Sampling (rollout): sometimes train on an input the model made itself.

    SimpleTuner's keys and defaults (``documentation/experimental/SCHEDULED_SAMPLING.md``). With the
    probability of the step, a micro-batch is first denoised under no-grad by the current weights for
    ``k`` Euler steps from a noisier level down to its training noise level, and the normal flow
    loss is taken on that self-made input (``trainer_core/train/scheduled_sampling.py``). Off while
    ``scheduled_sampling_max_step_offset`` is 0 or the probability is 0. ReflexFlow's loss terms come
    with it unless ``scheduled_sampling_reflexflow`` is false (SimpleTuner's default for flow models).
    """

    scheduled_sampling_max_step_offset: int = Field(
        0,
        ge=0,
        le=999,
        description="Most rollout steps (k is drawn in 1..this); each step is 1/1000 of the noise range "
        "(SimpleTuner's training timesteps) and costs one extra forward pass. 0 turns rollout off.",
    )
    scheduled_sampling_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance that a micro-batch is rolled out (without a ramp)."
    )
    scheduled_sampling_prob_start: float | None = Field(
        None, ge=0.0, le=1.0, description="Ramp: the probability at its start; None: scheduled_sampling_probability."
    )
    scheduled_sampling_prob_end: float = Field(0.5, ge=0.0, le=1.0, description="Ramp: the probability at its end.")
    scheduled_sampling_ramp_steps: int = Field(
        0, ge=0, description="Ramp the probability from prob_start to prob_end over this many steps; 0: no ramp."
    )
    scheduled_sampling_start_step: int = Field(0, ge=0, description="The step at which the ramp starts.")
    scheduled_sampling_ramp_shape: Literal["linear", "cosine"] = "linear"
    scheduled_sampling_strategy: Literal["uniform", "biased_early", "biased_late"] = Field(
        "uniform",
        description="How k is drawn: uniform over 1..max, biased_early towards short rollouts, biased_late "
        "towards long ones.",
    )
    scheduled_sampling_sampler: str = Field(
        "euler", description="The rollout's solver; only 'euler' (what SimpleTuner uses for flow-matching models)."
    )

    scheduled_sampling_reflexflow: bool | None = Field(
        None,
        description="ReflexFlow's loss terms while scheduled sampling is on; None: on, SimpleTuner's default for "
        "flow-matching models. false turns them off.",
    )
    scheduled_sampling_reflexflow_alpha: float = Field(
        1.0, ge=0.0, description="ReflexFlow: weight of the exposure-bias loss reweighting (frequency compensation)."
    )
    scheduled_sampling_reflexflow_beta1: float = Field(
        10.0, ge=0.0, description="ReflexFlow: weight of the anti-drift term (prediction direction vs the path's)."
    )
    scheduled_sampling_reflexflow_beta2: float = Field(
        1.0, ge=0.0, description="ReflexFlow: scale of the (reweighted) flow loss."
    )

    @field_validator("scheduled_sampling_sampler")
    @classmethod
    def _euler_only(cls, v: str) -> str:
        name = str(v).strip().lower()
        if name in ROLLOUT_SAMPLERS_REFUSED:
            raise ValueError(
                f"scheduled_sampling_sampler {v!r} is not supported: the rollout steps with Euler, which is what "
                "SimpleTuner itself does for flow-matching models (Kandinsky 5, Lumina 2) whatever this key says; "
                "set it to 'euler'"
            )
        if name not in ROLLOUT_SAMPLERS:
            raise ValueError(f"unknown scheduled_sampling_sampler {v!r}; allowed: {', '.join(ROLLOUT_SAMPLERS)}")
        return name

    @property
    def enabled(self) -> bool:
        """Whether any step can roll out (an offset, and a probability or a ramp that is not all zero)."""
        if self.scheduled_sampling_max_step_offset <= 0:
            return False
        if self.scheduled_sampling_ramp_steps > 0:
            start = self.scheduled_sampling_prob_start
            start = self.scheduled_sampling_probability if start is None else start
            return start > 0 or self.scheduled_sampling_prob_end > 0
        return self.scheduled_sampling_probability > 0

    @property
    def reflexflow_enabled(self) -> bool:
        """ReflexFlow's terms apply: scheduled sampling is on and ReflexFlow is not turned off."""
        return self.enabled and self.scheduled_sampling_reflexflow is not False


class CheckpointSpec(_Section):
    checkpoint_step_interval: int | None = Field(None, ge=1)
    checkpoints_total_limit: int | None = Field(5, ge=1)
    resume_from_checkpoint: str | None = Field(
        "latest",
        description="'latest' (the newest intact checkpoint of output_dir), a checkpoint folder (step-N, "
        "SimpleTuner's checkpoint-N, or a path), or None / '' to start fresh.",
    )
    resume_with_changes: bool = Field(
        False,
        description="Resume even though settings that define the run changed since the checkpoint (a new "
        "learning rate, a longer cosine schedule): the new settings apply from the checkpoint's step on. "
        "Without it such a resume stops and lists the changes.",
    )


class ValidationSpec(_Section):
    validation_prompt: str | None = None
    user_prompt_library: dict[str, str] | str | None = Field(
        None, description="A JSON file (or mapping) of name -> prompt, all rendered at each validation."
    )
    validation_negative_prompt: str | None = None
    validation_guidance: float | None = Field(None, ge=0)
    validation_guidance_rescale: float = Field(0.0, ge=0, le=1)
    validation_num_inference_steps: int = Field(30, ge=1)
    validation_resolution: str | None = None
    validation_seed: int | None = None
    validation_step_interval: int | None = Field(None, ge=1)
    validation_disable_unconditional: bool = False
    validation_lycoris_strength: float = Field(
        1.0, ge=0, description="LyCORIS adapters render validation at this multiplier (PEFT LoRA ignores it)."
    )
    validation_disable: bool = False
    disable_benchmark: bool = False
    validation_num_video_frames: int | None = Field(None, ge=1)
    framerate: float | None = Field(None, gt=0)
    validation_using_datasets: bool = False
    eval_dataset_id: str | None = None
    # CLIP score of the validation renders (trainer_core.train.evaluation); SimpleTuner's keys and meanings.
    evaluation_type: Literal["none", "clip"] = Field(
        "none", description="'clip': score each validation render against its prompt with a CLIP model."
    )
    eval_steps_interval: int | None = Field(
        None,
        ge=1,
        description="Score every N steps (rendering the validation prompts there if validation_step_interval "
        "does not); None scores every validation render. Step 0 and the final step are always scored.",
    )
    pretrained_evaluation_model_name_or_path: str = Field(
        "openai/clip-vit-large-patch14",
        min_length=1,
        description="The CLIP model: a Hugging Face repo id (or its copy in the HF cache) or a local folder "
        "saved with CLIPModel.save_pretrained plus its tokenizer.",
    )

    @field_validator("validation_resolution")
    @classmethod
    def _parse_resolutions(cls, v: str | None) -> str | None:
        if v is not None:
            parse_resolution_list(v)
        return v


class VideoSpec(_Section):
    """The ``video`` block of a video dataset (SimpleTuner's meanings).

    Frame-count rules that depend on the model's VAE (Kandinsky 5: ``(frames - 1) % 4 == 0``) are
    checked by the model family, which knows them.
    """

    num_frames: int | None = Field(None, ge=1, description="Frames per training clip.")
    min_frames: int | None = Field(None, ge=1, description="Shorter videos are dropped (and listed).")
    max_frames: int | None = Field(None, ge=1, description="Longer videos are cut to this many frames.")
    frame_rate: float | None = Field(None, gt=0, description="Resample clips to this rate (frames/s).")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = "aspect_ratio"
    frame_interval: int | None = Field(
        None, ge=1, description="resolution_frames: frame counts are grouped in steps of this size."
    )
    is_i2v: bool = False


class DatasetSpec(_Section):
    """One entry of SimpleTuner's ``multidatabackend.json``."""

    id: str
    type: Literal["local"] = "local"
    dataset_type: Literal["image", "video", "text_embeds", "conditioning"] = "image"
    disabled: bool = False
    instance_data_dir: str | None = None
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] = "textfile"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    resolution: float | None = Field(None, gt=0)
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = None
    minimum_image_size: float | None = Field(None, ge=0)
    maximum_image_size: float | None = Field(None, gt=0)
    minimum_aspect_ratio: float | None = Field(
        None, gt=0, description="Files whose bucket's width/height is below this are left out (and listed)."
    )
    maximum_aspect_ratio: float | None = Field(
        None, gt=0, description="Files whose bucket's width/height is above this are left out (and listed)."
    )
    target_downsample_size: float | None = Field(None, gt=0)
    crop: bool = False
    crop_style: Literal["center", "centre", "random", "corner"] = "center"
    crop_aspect: Literal["square", "closest", "preserve", "random"] = "square"
    crop_aspect_buckets: list[float] | None = None
    repeats: int = Field(0, ge=0, description="Extra passes over the data per epoch (0 = seen once).")
    cache_dir_vae: str | None = None
    metadata_backend: Literal["discovery"] = "discovery"
    video: VideoSpec | None = None
    # image editing (Kandinsky 5 i2i): an image dataset names the ``dataset_type: conditioning`` dataset
    # that holds its reference images, paired 1:1 by relative file name without extension
    conditioning_data: str | None = Field(
        None, description="id of the conditioning dataset whose images are this dataset's references."
    )
    conditioning_type: Literal["reference_strict"] | None = Field(
        None,
        description="reference_strict: every training image has exactly one reference with the same file name.",
    )
    # text_embeds datasets
    default: bool = False
    cache_dir: str | None = None
    write_batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        low, high = self.minimum_aspect_ratio, self.maximum_aspect_ratio
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"dataset {self.id!r}: minimum_aspect_ratio {low:g} is above maximum_aspect_ratio {high:g}, "
                "so every file would be left out"
            )
        if self.dataset_type == "conditioning" and not self.disabled and not self.instance_data_dir:
            raise ValueError(f"conditioning dataset {self.id!r} needs instance_data_dir (the reference images)")
        if self.conditioning_data and self.dataset_type != "image":
            raise ValueError(
                f"dataset {self.id!r}: conditioning_data pairs reference images with training images, "
                "so it belongs on a dataset_type 'image' entry"
            )
        if self.dataset_type in ("image", "video") and not self.disabled:
            if not self.instance_data_dir:
                raise ValueError(f"dataset {self.id!r} needs instance_data_dir")
            if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
                raise ValueError(
                    f"dataset {self.id!r} uses caption_strategy 'instanceprompt' but has no instance_prompt"
                )
        return self


class ExportSpec(_Section):
    comfyui_lora_dir: str | None = Field(
        None, description="Also copy each final ComfyUI-format LoRA here (ComfyUI's loras/comfyui-tuner)."
    )
    comfyui_model_dir: str | None = Field(
        None,
        description="Where the ComfyUI nodes place a full fine-tune's ComfyUI diffusion-model file "
        "(diffusion_models/comfyui-tuner); the engine leaves it in output_dir.",
    )
    output_name: str = "lora"
    # Publishing to the Hugging Face Hub (trainer_core/publish/): SimpleTuner's keys and defaults.
    push_to_hub: bool = Field(False, description="Upload the final model, its card and samples to hub_model_id.")
    push_checkpoints_to_hub: bool = Field(
        False, description="With push_to_hub: also upload each checkpoint's exports (checkpoints/step-N/ in the repo)."
    )
    hub_model_id: str | None = Field(None, description="The Hub repository, 'user/name' (or 'name' under your user).")
    model_card_private: bool = Field(True, description="Create the repository private (SimpleTuner's default).")
    model_card_safe_for_work: bool = Field(
        False, description="Tag the card safe-for-work instead of not-for-all-audiences."
    )
    model_card_note: str | None = Field(None, description="A paragraph shown near the top of the model card.")

    @field_validator("hub_model_id")
    @classmethod
    def _hub_repo_id(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        repo = v.strip().removeprefix("https://").removeprefix("huggingface.co/").strip("/")
        parts = repo.split("/")
        if len(parts) > 2 or not all(_HUB_NAME.fullmatch(p) for p in parts):
            raise ValueError(
                f"{v!r} is not a Hub repository id: write 'user/name' or 'name' "
                "(letters, digits, '-', '_', '.'; at most 96 characters each)"
            )
        return repo

    @model_validator(mode="after")
    def _hub_target(self) -> ExportSpec:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError(
                "push_to_hub needs hub_model_id, the repository to upload to ('your-name/my-lora'); "
                "set it, or turn push_to_hub off"
            )
        return self


# report_to values a run can log to; "all" is every one of them whose package is installed (accelerate's "all").
TRACKERS = ("tensorboard", "wandb")
# SimpleTuner's other report_to values, each with what it is: refused by name, never dropped silently.
OTHER_TRACKERS = {
    "simpletuner": "SimpleTuner's own local charts and report",
    "swanlab": "SwanLab",
    "comet_ml": "Comet ML",
    "mlflow": "MLflow",
    "aim": "Aim",
    "clearml": "ClearML",
    "dvclive": "DVCLive",
    "trackio": "Trackio",
    "custom-tracker": "a custom accelerate tracker module (custom_tracker)",
}


class TrackingSpec(_Section):
    """Where a run's metrics go besides the node and the terminal: SimpleTuner's tracker keys.

    ``report_to``: ``none``, ``tensorboard``, ``wandb``, ``all`` (both, as far as installed) or a
    comma list (``tensorboard,wandb``). TensorBoard writes to ``<logging_dir>/<tracker_project_name>``
    (as accelerate does for SimpleTuner); a relative ``logging_dir`` is inside ``output_dir``.
    Tracking never changes what is learnt (trackers only read the run's events).
    """

    report_to: str = Field("none", description="none, tensorboard, wandb, all, or a comma list of trackers")
    tracker_project_name: str | None = Field(
        None, description="The project (wandb) / TensorBoard folder; None: comfyui-tuner."
    )
    tracker_run_name: str | None = Field(None, description="The run's name; None: the name of output_dir's folder.")
    logging_dir: str = Field("logs", description="TensorBoard's and wandb's folder; relative: inside output_dir.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        """SimpleTuner's spellings: None or "" is "none"; a list or a comma string names several trackers."""
        if value is None or value is False:
            return "none"
        parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
        names = [str(p).strip().lower() for p in parts if str(p).strip()]
        names = [n for n in names if n not in ("none", "null")] if len(names) > 1 else names
        if not names or names == ["null"]:
            return "none"
        unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
        if unknown:
            named = ", ".join(f"{n!r}" + (f" ({OTHER_TRACKERS[n]})" if n in OTHER_TRACKERS else "") for n in unknown)
            raise ValueError(
                f"report_to {named} is not supported; comfyui-tuner logs to 'none', 'tensorboard', 'wandb' "
                "or 'all' (both), or a comma list such as 'tensorboard,wandb'"
            )
        if "all" in names:
            return "all"
        return ",".join(dict.fromkeys(names))

    def trackers(self) -> list[str]:
        """The trackers ``report_to`` asks for, in TRACKERS order ("all": both; the run keeps the installed ones)."""
        if self.report_to == "none":
            return []
        names = TRACKERS if self.report_to == "all" else self.report_to.split(",")
        return [t for t in TRACKERS if t in names]


class TrainSpec(_Section):
    """Everything a run needs. JSON round-trips exactly (``to_json`` / ``from_json``)."""

    output_dir: str = "output"
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    crepa: CrepaSpec = Field(default_factory=CrepaSpec)
    scheduled_sampling: ScheduledSamplingSpec = Field(default_factory=ScheduledSamplingSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    datasets: list[DatasetSpec] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        ids = [d.id for d in self.datasets]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"dataset ids must be unique; repeated: {', '.join(dupes)}")
        kinds = {d.id: d.dataset_type for d in self.datasets}
        for d in self.datasets:
            if d.conditioning_data and kinds.get(d.conditioning_data) != "conditioning":
                found = kinds.get(d.conditioning_data)
                raise ValueError(
                    f"dataset {d.id!r}: conditioning_data {d.conditioning_data!r} must name a dataset with "
                    f"dataset_type 'conditioning'"
                    + (f" (it is a {found!r} dataset)" if found else " (no dataset has that id)")
                )
        return self

    # ---------------------------------------------------------------- serialisation
    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        return build_spec(json.loads(text), source="spec JSON")

    @classmethod
    def load(cls, path: str | Path) -> TrainSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"spec file {path} does not exist") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return build_spec(data, source=str(path))

    def save(self, path: str | Path) -> None:
        from .io_utils import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    def fingerprint(self) -> str:
        """A short hash of the whole spec: stored in LoRA metadata to say what produced it."""
        return hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- views
    @property
    def training_datasets(self) -> list[DatasetSpec]:
        """Enabled image and video datasets: what the model trains on."""
        return [d for d in self.datasets if d.dataset_type in ("image", "video") and not d.disabled]

    @property
    def image_datasets(self) -> list[DatasetSpec]:
        return [d for d in self.training_datasets if d.dataset_type == "image"]

    @property
    def video_datasets(self) -> list[DatasetSpec]:
        return [d for d in self.training_datasets if d.dataset_type == "video"]

    @property
    def text_embed_dataset(self) -> DatasetSpec | None:
        embeds = [d for d in self.datasets if d.dataset_type == "text_embeds" and not d.disabled]
        defaults = [d for d in embeds if d.default]
        return (defaults or embeds or [None])[0]

    def text_cache_dir(self) -> Path:
        ds = self.text_embed_dataset
        if ds is not None and ds.cache_dir:
            return Path(ds.cache_dir)
        return Path(self.output_dir) / "cache" / "text"

    def vae_cache_dir(self, dataset: DatasetSpec) -> Path:
        if dataset.cache_dir_vae:
            return Path(dataset.cache_dir_vae)
        return Path(self.output_dir) / "cache" / "vae" / dataset.id

    def validation_prompts(self) -> dict[str, str]:
        """name -> prompt for every validation render (the prompt, then the library)."""
        out: dict[str, str] = {}
        v = self.validation
        if v.validation_prompt:
            out["validation"] = v.validation_prompt
        lib = v.user_prompt_library
        if isinstance(lib, str):
            try:
                lib = json.loads(Path(lib).read_text())
            except FileNotFoundError as e:
                raise ConfigError(
                    f"user_prompt_library file {lib} does not exist", "fix the path or remove the key"
                ) from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"user_prompt_library file {lib} is not valid JSON: {e}") from e
        if lib:
            if not isinstance(lib, dict) or not all(isinstance(p, str) for p in lib.values()):
                raise ConfigError("user_prompt_library must map names to prompt strings")
            out.update(lib)
        return out


def parse_resolution_list(text: str) -> list[tuple[int, int]]:
    """'1024x768, 512' -> [(1024, 768), (512, 512)] as (width, height)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            if "x" in part:
                w, h = part.split("x", 1)
                out.append((int(w), int(h)))
            else:
                out.append((int(float(part)), int(float(part))))
        except ValueError as e:
            raise ValueError(
                f"validation_resolution {text!r}: use 'WxH' or a comma list like '1024x1024,768x512'"
            ) from e
    if not out:
        raise ValueError(f"validation_resolution {text!r} holds no size")
    return out


def build_spec(data: dict[str, Any], source: str = "spec") -> TrainSpec:
    """Validate ``data`` into a TrainSpec, turning pydantic's report into one ConfigError."""
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {source}:\n{format_validation_error(e)}") from None


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model holding the field at ``loc`` (``("lora", "lora_rnak")`` -> LoraSpec), or None."""
    model: type[BaseModel] = TrainSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into the datasets list: same model
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        inner = [info.annotation, *get_args(info.annotation)]
        inner += [a for m in list(inner) for a in get_args(m)]  # list[DatasetSpec], VideoSpec | None
        found = [m for m in inner if isinstance(m, type) and issubclass(m, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


def unknown_key_note(loc: tuple[Any, ...]) -> str:
    """What to say after "not a known option" for the key at ``loc``: its right section, or a near key.

    A TrainSpec JSON groups keys in sections, so a real key in the wrong one (``training.learning_rate``)
    is told where it belongs; otherwise a close spelling among the section's keys is proposed
    (``lora.lora_rnak``: did you mean lora_rank?).
    """
    import difflib

    if not loc:
        return ""
    key = str(loc[-1])
    model = _section_model(tuple(loc))
    if model is None:
        return ""
    if model is TrainSpec or len(loc) == 2:
        for name, info in TrainSpec.model_fields.items():
            section = info.annotation
            if isinstance(section, type) and issubclass(section, BaseModel) and key in section.model_fields:
                if section is not model:
                    return f"; {key} belongs in the {name!r} section"
    close = difflib.get_close_matches(key.lower().replace("-", "_"), list(model.model_fields), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        elif err["type"] == "extra_forbidden":
            msg = "not a known option" + unknown_key_note(tuple(err["loc"]))
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
