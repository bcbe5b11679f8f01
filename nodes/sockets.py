"""Socket types and categories shared by the nodes.

Our sockets carry TrainSpec fragments: plain, JSON-serialisable dicts shaped like (parts of) a
TrainSpec, e.g. ``{"model": {...}}``, ``{"datasets": [...]}`` or ``{"memory": {...}}``. Never live
models: the trainer runs in a child process that loads its own weights, and plain data keeps
ComfyUI's output cache small and its cache keys meaningful. ``LORA_MODEL`` and ``LOSS_MAP`` are ComfyUI's own types, so
Train LoRA wires into the stock LoRA and loss-graph nodes.
"""

from __future__ import annotations

from comfy_api.latest import io

TunerModel = io.Custom("TUNER_MODEL")
TunerDataset = io.Custom("TUNER_DATASET")
TunerValidation = io.Custom("TUNER_VALIDATION")
TunerValidationVideo = io.Custom("TUNER_VALIDATION_VIDEO")  # {"validation_video": {...}}: Validation Video Options
TunerOptimizer = io.Custom("TUNER_OPTIMIZER")
TunerSpec = io.Custom("TUNER_SPEC")
TunerMemory = io.Custom("TUNER_MEMORY")  # {"memory": {...}}: Configure Offload/Quant
TunerTread = io.Custom("TUNER_TREAD")  # {"routing": {"tread_config": {"routes": [...]}}}: TREAD Route, chained
TunerAdapter = io.Custom("TUNER_ADAPTER")  # {"lora": {lora_type, use_dora, lycoris...}}: Adapter Settings
TunerRegularisersSocket = io.Custom("TUNER_REGULARISERS")  # {"scheduled_sampling": {...}}: Regularisers
TunerTrackingSocket = io.Custom("TUNER_TRACKING")  # {"tracking": {report_to, ...}}: Tracking
TunerPublishSocket = io.Custom("TUNER_PUBLISH")  # {"export": {push_to_hub, hub_model_id...}}: Publish to Hub
TunerVideo = io.Custom("TUNER_VIDEO")  # {"video": {...}}: Video Options, the video block of one dataset
LoraModel = io.Custom("LORA_MODEL")
LossMap = io.Custom("LOSS_MAP")

CATEGORY = "Tuner"
CATEGORY_MODELS = f"{CATEGORY}/models"
CATEGORY_DATA = f"{CATEGORY}/dataset"
CATEGORY_SETTINGS = f"{CATEGORY}/settings"
CATEGORY_TRAIN = f"{CATEGORY}/train"
CATEGORY_LORA = f"{CATEGORY}/lora"
CATEGORY_CONFIG = f"{CATEGORY}/config"
