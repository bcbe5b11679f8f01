"""Optional settings nodes: validation samples, and the optimizer with its batch and EMA options.

Each produces TrainSpec sections (plain data) for Train LoRA. Leaving one unconnected keeps the
defaults: no validation samples, AdamW (bf16) with a constant learning rate. Values that default to
the model family's choice (guidance, validation resolution) use 0 / empty for "family default".
"""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer_core.errors import ConfigError
from ..trainer_core.spec import LR_SCHEDULERS, OPTIMIZERS
from .run_spec import checked, family_defaults
from .sockets import CATEGORY_SETTINGS, TunerOptimizer, TunerValidation, TunerValidationVideo


class TunerValidationSettings(io.ComfyNode):
    """Validation Settings: sample images rendered with the LoRA while it trains."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerValidationSettings",
            display_name="Validation Settings",
            category=CATEGORY_SETTINGS,
            description="Render sample images with the LoRA as it trains; they appear on Train LoRA's node.",
            inputs=[
                io.String.Input(
                    "prompt",
                    default="",
                    multiline=True,
                    tooltip="The prompt of the sample images. Write it like your captions (include the trigger "
                    "word). The model's own prompt format is added as in training (Lumina 2: its system prompt; "
                    "Kandinsky 5: the authors' Qwen template).",
                ),
                io.String.Input(
                    "negative_prompt",
                    default="",
                    multiline=True,
                    tooltip="Negative prompt for the samples (empty: none).",
                ),
                io.Int.Input(
                    "every_n_steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Render samples every this many steps; 0 renders them only when training ends.",
                ),
                io.String.Input(
                    "resolution",
                    default="",
                    tooltip="Sample size as WxH, or a comma list (1024x1024,768x1344). Empty: the model's default.",
                ),
                io.Float.Input(
                    "guidance",
                    default=0.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Classifier-free guidance of the samples; 0 uses the model's default "
                    f"({family_defaults('validation_guidance')}).",
                ),
                io.Int.Input(
                    "steps",
                    default=30,
                    min=1,
                    max=200,
                    tooltip="Sampling steps per sample image.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,  # fixed, or the frontend re-randomises it on every queue
                    tooltip="Noise seed of the samples; fixed so samples at different steps compare like with like.",
                ),
                io.Boolean.Input(
                    "base_model_samples",
                    default=True,
                    tooltip="Also render the prompt with the untrained model at step 0, to compare against.",
                ),
                io.Boolean.Input(
                    "unconditional",
                    default=False,
                    tooltip="Also render an empty prompt, which shows what the LoRA does on its own.",
                ),
                io.Combo.Input(
                    "evaluation",
                    options=["none", "clip"],
                    default="none",
                    tooltip="clip: score each sample against its prompt with a CLIP model (100 x cosine, at least 0; "
                    "SimpleTuner's evaluation_type). The score is drawn on the loss chart in green; the base model "
                    "is scored at step 0 when base model samples are on.",
                ),
                io.Int.Input(
                    "eval_every",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="With evaluation clip: score every this many steps (samples are rendered there too); "
                    "0 scores every time samples are rendered. The last step is always scored.",
                ),
                io.String.Input(
                    "clip_model",
                    default="openai/clip-vit-large-patch14",
                    tooltip="With evaluation clip: the CLIP model, a Hugging Face repo id or a local folder "
                    "(CLIPModel and its tokenizer saved together).",
                ),
                TunerValidationVideo.Input(
                    "video",
                    optional=True,
                    tooltip="Video models: frames and frame rate of the validation clips (Validation Video "
                    "Options). Unconnected: the model's defaults (61 frames at 24 fps).",
                ),
            ],
            outputs=[TunerValidation.Output("validation", tooltip="Validation settings for Train LoRA.")],
        )

    @classmethod
    def execute(
        cls,
        prompt: str,
        negative_prompt: str,
        every_n_steps: int,
        resolution: str,
        guidance: float,
        steps: int,
        seed: int,
        base_model_samples: bool,
        unconditional: bool,
        evaluation: str = "none",
        eval_every: int = 0,
        clip_model: str = "openai/clip-vit-large-patch14",
        video: dict | None = None,
    ) -> io.NodeOutput:
        if not prompt.strip():
            raise ConfigError("Validation Settings needs a prompt", "write the prompt the sample images should show")
        section = {
            "validation_prompt": prompt.strip(),
            "validation_negative_prompt": negative_prompt.strip() or None,
            "validation_step_interval": every_n_steps or None,
            "validation_resolution": resolution.strip() or None,
            "validation_guidance": guidance or None,
            "validation_num_inference_steps": int(steps),
            "validation_seed": int(seed),
            "disable_benchmark": not base_model_samples,
            "validation_disable_unconditional": not unconditional,
            "validation_disable": False,
            "evaluation_type": evaluation,
            "eval_steps_interval": eval_every or None,
            "pretrained_evaluation_model_name_or_path": clip_model.strip() or "openai/clip-vit-large-patch14",
            **(video or {}).get("validation_video", {}),
        }
        if evaluation != "none":  # a missing CLIP folder is reported here, on the node that names it
            from ..trainer_core.train.evaluation import check_evaluation_model

            check_evaluation_model(section["pretrained_evaluation_model_name_or_path"])
        return io.NodeOutput({"validation": checked("validation", section)})


class TunerValidationVideoOptions(io.ComfyNode):
    """Validation Video Options: clip length and frame rate of the validation samples of video models.

    A node of its own, so image graphs' Validation Settings carry no video-only widgets.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerValidationVideoOptions",
            display_name="Validation Video Options",
            category=CATEGORY_SETTINGS,
            description="Video models: how many frames each validation clip has and the frame rate of the saved "
            ".mp4. Connect it to Validation Settings' video input.",
            inputs=[
                io.Int.Input(
                    "frames",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="Frames per validation clip, 4k+1 and at least 17 (e.g. 17, 33, 61, 121). "
                    "0: the model's default (61, 2.5 s at 24 fps).",
                ),
                io.Float.Input(
                    "frame_rate",
                    default=0.0,
                    min=0.0,
                    max=240.0,
                    step=1.0,
                    tooltip="Frame rate of the saved validation .mp4. 0: 24, Kandinsky 5's own.",
                ),
            ],
            outputs=[
                TunerValidationVideo.Output("video", tooltip="For Validation Settings' video input."),
            ],
        )

    @classmethod
    def execute(cls, frames: int, frame_rate: float) -> io.NodeOutput:
        section = {"validation_num_video_frames": int(frames) or None, "framerate": float(frame_rate) or None}
        checked("validation", section)  # Train LoRA checks the count against the chosen flavour (4k+1)
        return io.NodeOutput({"validation_video": section})


class TunerOptimizerSettings(io.ComfyNode):
    """Optimizer Settings: optimizer, learning-rate schedule, batch, EMA and caption dropout."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TunerOptimizerSettings",
            display_name="Optimizer Settings",
            category=CATEGORY_SETTINGS,
            description="How the LoRA's weights are updated. The learning rate itself is set on Train LoRA.",
            inputs=[
                io.Combo.Input(
                    "optimizer",
                    options=list(OPTIMIZERS),
                    default="adamw_bf16",
                    tooltip="adamw_bf16 (recommended) keeps its state in bf16; prodigy finds its own step size "
                    "(set the learning rate to 1); lion and optimi-* need less memory. For full fine-tunes: "
                    "ao-adamw8bit / ao-adamfp8 (~2 bytes of state per weight), ao-adamw4bit (~1), optimi-adamw "
                    "(Kahan summation for bf16 weights), bnb-* (needs bitsandbytes). All run on the CPU too.",
                ),
                io.Combo.Input(
                    "lr_scheduler",
                    options=list(LR_SCHEDULERS),
                    default="constant",
                    tooltip="How the learning rate changes over the run.",
                ),
                io.Int.Input(
                    "lr_warmup_steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Steps over which the learning rate rises from 0 at the start.",
                ),
                io.Float.Input(
                    "weight_decay",
                    default=0.01,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Pulls the LoRA weights towards zero a little each step (AdamW-style decay).",
                ),
                io.Float.Input(
                    "max_grad_norm",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Clip the gradient norm to this; 0 disables clipping.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Images per step (more needs more memory).",
                ),
                io.Int.Input(
                    "gradient_accumulation_steps",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Average this many batches per step: a larger effective batch without more memory.",
                ),
                io.Boolean.Input(
                    "use_ema",
                    default=False,
                    tooltip="Also keep an exponential moving average of the LoRA and save it as a second file.",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.995,
                    min=0.5,
                    max=0.99999,
                    step=0.0001,
                    tooltip="How slowly the EMA follows the weights (closer to 1 = slower).",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of steps trained with an empty caption; helps the LoRA work without its "
                    "trigger word and with guidance.",
                ),
            ],
            outputs=[TunerOptimizer.Output("optimizer", tooltip="Optimizer settings for Train LoRA.")],
        )

    @classmethod
    def execute(
        cls,
        optimizer: str,
        lr_scheduler: str,
        lr_warmup_steps: int,
        weight_decay: float,
        max_grad_norm: float,
        batch_size: int,
        gradient_accumulation_steps: int,
        use_ema: bool,
        ema_decay: float,
        caption_dropout: float,
    ) -> io.NodeOutput:
        opt = {
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "lr_warmup_steps": int(lr_warmup_steps),
            "adam_weight_decay": float(weight_decay),
            "max_grad_norm": float(max_grad_norm),
        }
        training = {
            "train_batch_size": int(batch_size),
            "gradient_accumulation_steps": int(gradient_accumulation_steps),
            "use_ema": bool(use_ema),
            "ema_decay": float(ema_decay),
            "caption_dropout_probability": float(caption_dropout),
        }
        return io.NodeOutput({"optimizer": checked("optimizer", opt), "training": checked("training", training)})


NODES = [TunerValidationSettings, TunerValidationVideoOptions, TunerOptimizerSettings]
