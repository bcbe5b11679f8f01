"""CLIP evaluation of the validation renders (SimpleTuner's ``evaluation_type: clip``).

What a user relies on: the score is torchmetrics' CLIPScore (what SimpleTuner logs as ``clip/*``),
the base model is scored at step 0 and then on schedule, the history survives a resume, and the
SimpleTuner keys import and export. The CLIP model is tiny and random but a real
``transformers.CLIPModel`` with its tokenizer and image processor, saved to a folder and loaded back
the way openai/clip-vit-large-patch14 is.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from PIL import Image

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.simpletuner import UNSUPPORTED_MESSAGE, export_simpletuner, import_simpletuner
from trainer_core.spec import TrainSpec, build_spec
from trainer_core.testing.tiny import build_tiny_clip
from trainer_core.train import checkpoint as ckpt
from trainer_core.train.engine import Trainer
from trainer_core.train.evaluation import ClipScorer, evaluate

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CAPTIONS = {"a": "pixel art of a red circle", "b": "a blue one"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _noise_image(seed: int, size: int = 32) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _cosine_by_hand(folder: Path, image: Image.Image, prompt: str) -> float:
    """CLIP's own forward (logits_per_image = exp(logit_scale) * cos), preprocessing written out."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).float().eval()
    tokens = CLIPTokenizer.from_pretrained(folder)([prompt], padding=True, return_tensors="pt")
    # a 32x32 image needs no resize or crop at the tiny model's 32 pixels: rescale, then CLIP's mean/std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    x = torch.from_numpy(np.asarray(image, dtype="float32")).permute(2, 0, 1) / 255.0
    pixels = ((x - mean) / std).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return float(out.logits_per_image[0, 0] / model.logit_scale.detach().exp())


# ----------------------------------------------------------------------------- the score
def test_the_clip_score_is_100_times_the_cosine_clipped_at_0_by_hand(tiny_clip):
    scorer = ClipScorer(str(tiny_clip))
    for seed, prompt in enumerate(["pixel art of a red circle", "a blue one", "xyz", "a cat on a mat"]):
        image = _noise_image(seed)
        cos = _cosine_by_hand(tiny_clip, image, prompt)
        assert scorer.score([image], prompt) == pytest.approx(max(100 * cos, 0.0), abs=1e-4)


def test_a_video_scores_the_mean_over_its_frames_then_clips(tiny_clip):
    scorer = ClipScorer(str(tiny_clip))
    frames = [_noise_image(s) for s in range(3)]
    cosines = [_cosine_by_hand(tiny_clip, f, "a blue one") for f in frames]
    assert scorer.score(frames, "a blue one") == pytest.approx(max(100 * sum(cosines) / 3, 0.0), abs=1e-4)


def test_a_video_render_is_scored_on_all_its_frames():
    from trainer_core.media import RenderedVideo
    from trainer_core.train.evaluation import frames_of

    frames = [_noise_image(s) for s in range(3)]
    assert frames_of(RenderedVideo(frames, 24.0)) == frames and frames_of(frames[0]) == [frames[0]]


def test_an_evaluation_is_the_mean_of_the_prompts_and_skips_the_unconditional_render(tiny_clip):
    scorer = ClipScorer(str(tiny_clip))
    red, blue = _noise_image(1), _noise_image(2)
    renders = [("validation", "a red one", red), ("blue", "a blue one", blue), ("unconditional", "", red)]
    found = evaluate(scorer, 7, renders)
    assert found.step == 7 and set(found.scores) == {"validation", "blue"}
    assert found.scores["blue"] == pytest.approx(scorer.score([blue], "a blue one"), abs=1e-4)
    assert found.clip_score == pytest.approx(sum(found.scores.values()) / 2, abs=1e-4)
    assert evaluate(scorer, 7, [("unconditional", "", red)]) is None


# ----------------------------------------------------------------------------- in a run
def _spec(model: Path, data: Path, out: Path, clip: Path, **validation) -> TrainSpec:
    return build_spec(  # build_spec: pydantic's report as one ConfigError naming the key
        lumina_spec(
            model,
            data,
            out,
            training={"max_train_steps": 5},
            validation={
                "validation_disable": False,
                "validation_prompt": "pixel art of a red circle",
                "user_prompt_library": {"blue": "a blue one"},
                "validation_resolution": "64x64",
                "validation_num_inference_steps": 2,
                "evaluation_type": "clip",
                "eval_steps_interval": 2,
                "pretrained_evaluation_model_name_or_path": str(clip),
                **validation,
            },
        )
    )


def test_a_lumina2_run_scores_step_0_every_interval_and_the_end_and_keeps_them(tiny_lumina2, tiny_clip, tmp_path):
    data = write_dataset(tmp_path / "data", CAPTIONS)
    sink = ListSink()
    result = Trainer(_spec(tiny_lumina2, data, tmp_path / "out", tiny_clip), sink).run()

    # the base model at step 0, then every eval_steps_interval (2) steps, then the final step; each
    # evaluation renders the validation prompts (no validation_step_interval here) and scores them
    evaluations = sink.of("evaluation")
    assert [e["step"] for e in evaluations] == [0, 2, 4, 5]
    assert [e["step"] for e in sink.of("validation")] == [0, 2, 4, 5]
    for e in evaluations:
        assert set(e["scores"]) == {"validation", "blue"}  # the unconditional render is not scored
        assert 0 <= e["clip_score"] <= 100
        assert e["clip_score"] == pytest.approx(sum(e["scores"].values()) / 2, abs=1e-3)
    # the run's summary (the result and the done event) and the checkpoints carry the history
    history = [{k: e[k] for k in ("step", "clip_score", "scores")} for e in evaluations]
    assert result.evaluations == history
    assert sink.of("done")[0]["evaluations"] == history
    step3 = ckpt.load_checkpoint(tmp_path / "out" / "checkpoints" / "step-3")
    assert step3.state.evaluations == history[:2]
    # the final validation is scored before the final checkpoint, so a re-queue with more steps keeps its score
    step5 = ckpt.load_checkpoint(tmp_path / "out" / "checkpoints" / "step-5")
    assert step5.state.evaluations == history

    longer = _spec(tiny_lumina2, data, tmp_path / "out", tiny_clip)
    longer.training.max_train_steps = 6
    longer.checkpointing.resume_with_changes = True
    more = Trainer(longer, ListSink()).run()
    assert more.resumed_from.name == "step-5" and [e["step"] for e in more.evaluations] == [0, 2, 4, 5, 6]


def test_validation_renders_between_evaluations_are_not_scored(tiny_lumina2, tiny_clip, tmp_path):
    data = write_dataset(tmp_path / "data", CAPTIONS)
    sink = ListSink()
    spec = _spec(tiny_lumina2, data, tmp_path / "out", tiny_clip, validation_step_interval=1, eval_steps_interval=3)
    spec.training.max_train_steps = 3
    Trainer(spec, sink).run()
    assert [e["step"] for e in sink.of("validation")] == [0, 1, 2, 3]
    assert [e["step"] for e in sink.of("evaluation")] == [0, 3]


def test_a_resumed_run_keeps_the_history_and_scores_as_the_straight_run(tiny_lumina2, tiny_clip, tmp_path):
    data = write_dataset(tmp_path / "data", CAPTIONS)
    straight = Trainer(_spec(tiny_lumina2, data, tmp_path / "straight", tiny_clip), ListSink()).run()
    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    first = Trainer(_spec(tiny_lumina2, data, tmp_path / "split", tiny_clip), CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    sink = ListSink()
    second = Trainer(_spec(tiny_lumina2, data, tmp_path / "split", tiny_clip), sink).run()
    assert second.resumed_from.name == "step-3"
    assert [e["step"] for e in sink.of("evaluation")] == [4, 5]  # scored after the resume
    assert [e["step"] for e in second.evaluations] == [0, 2, 4, 5]  # and the history from before it
    for a, b in zip(second.evaluations, straight.evaluations, strict=True):
        assert a["clip_score"] == pytest.approx(b["clip_score"], abs=1e-3)


# ----------------------------------------------------------------------------- refused before any model loads
def test_bad_evaluation_settings_are_refused_before_any_model_loads(tiny_lumina2, tmp_path):
    data = write_dataset(tmp_path / "data", CAPTIONS)

    def prepare(**validation) -> None:
        Trainer(_spec(tiny_lumina2, data, tmp_path / "out", tmp_path / "clip", **validation)).prepare()

    with pytest.raises(ConfigError, match=r"pretrained_evaluation_model_name_or_path '.*clip': no such folder"):
        prepare()
    (tmp_path / "clip").mkdir()
    with pytest.raises(ConfigError, match=r"pretrained_evaluation_model_name_or_path .*has no config.json"):
        prepare()
    with pytest.raises(ConfigError, match="validation_disable"):
        prepare(validation_disable=True)
    with pytest.raises(ConfigError, match="no validation_prompt"):
        prepare(validation_prompt=None, user_prompt_library=None)
    with pytest.raises(ConfigError, match=r"validation.evaluation_type"):
        _spec(tiny_lumina2, data, tmp_path / "out", tmp_path / "clip", evaluation_type="fid")
    with pytest.raises(ConfigError, match=r"validation.eval_steps_interval"):
        _spec(tiny_lumina2, data, tmp_path / "out", tmp_path / "clip", eval_steps_interval=0)


# ----------------------------------------------------------------------------- SimpleTuner
def test_simpletuner_keys_import_with_simpletuners_default_model_and_export_back():
    result = import_simpletuner({"model_family": "lumina2", "evaluation_type": "clip", "eval_steps_interval": 50})
    v = result.spec.validation
    assert (v.evaluation_type, v.eval_steps_interval) == ("clip", 50)
    # SimpleTuner's CLIPModelEvaluator default when the config names none (ours is the 224-pixel CLIP-L)
    assert v.pretrained_evaluation_model_name_or_path == "openai/clip-vit-large-patch14-336"
    assert result.unsupported_keys == []

    config, backend = export_simpletuner(result.spec)
    assert config["evaluation_type"] == "clip" and config["eval_steps_interval"] == 50
    assert config["pretrained_evaluation_model_name_or_path"] == "openai/clip-vit-large-patch14-336"
    assert import_simpletuner(config, backend).spec == result.spec

    ours = TrainSpec.model_validate({"validation": {"evaluation_type": "clip"}})
    config, _ = export_simpletuner(ours)  # our default is written out, since SimpleTuner's differs
    assert config["pretrained_evaluation_model_name_or_path"] == "openai/clip-vit-large-patch14"
    assert "pretrained_evaluation_model_name_or_path" not in export_simpletuner(TrainSpec())[0]


def test_simpletuners_off_spellings_and_bad_values_name_the_key():
    for off in ("none", "None", "", None):
        assert import_simpletuner({"evaluation_type": off}).spec.validation.evaluation_type == "none"
    assert import_simpletuner({"eval_steps_interval": 0}).spec.validation.eval_steps_interval is None
    assert import_simpletuner({"evaluation_type": "CLIP"}).spec.validation.evaluation_type == "clip"
    with pytest.raises(ConfigError, match=r"evaluation_type"):
        import_simpletuner({"evaluation_type": "fid"})
    with pytest.raises(ConfigError, match=r"eval_steps_interval"):
        import_simpletuner({"eval_steps_interval": -5})
    # eval-loss keys (an eval dataset's loss, not the CLIP score) are still reported, never dropped silently
    result = import_simpletuner({"evaluation_type": "clip", "num_eval_images": 4, "eval_dataset_pooling": True})
    assert result.unsupported_keys == ["eval_dataset_pooling", "num_eval_images"]


def test_the_seed_lumina2_config_with_clip_evaluation_imports_without_a_not_supported_line():
    from test_simpletuner_import import LUMINA2_BACKEND, LUMINA2_CONFIG

    plain = import_simpletuner(json.loads(LUMINA2_CONFIG), json.loads(LUMINA2_BACKEND))
    config = {**json.loads(LUMINA2_CONFIG), "evaluation_type": "clip", "eval_steps_interval": 100}
    result = import_simpletuner(config, json.loads(LUMINA2_BACKEND))
    assert result.unsupported_keys == plain.unsupported_keys  # nothing new is ignored
    listing = [w for w in result.warnings if w.startswith(UNSUPPORTED_MESSAGE)]
    assert not any(k in line for line in listing for k in ("evaluation_type", "eval_steps_interval"))
    assert result.spec.validation.evaluation_type == "clip" and result.spec.validation.eval_steps_interval == 100


# ----------------------------------------------------------------------------- the node
def test_validation_settings_turns_clip_evaluation_on(tiny_clip, tmp_path):
    from importlib import import_module

    from comfy_stub import harness

    harness.install(tmp_path / "comfy")
    try:
        _, nodes = harness.load_pack()
        cls = nodes["TunerValidationSettings"]
        defaults = harness.schema_defaults(cls)
        off = harness.run_node(cls, **{**defaults, "prompt": "x"})[0]["validation"]
        assert off["evaluation_type"] == "none"  # unchanged graphs evaluate nothing
        on = harness.run_node(cls, **{**defaults, "prompt": "x", "evaluation": "clip", "eval_every": 50})[0]
        v = on["validation"]
        assert v["evaluation_type"] == "clip" and v["eval_steps_interval"] == 50
        assert v["pretrained_evaluation_model_name_or_path"] == "openai/clip-vit-large-patch14"
        local = {**defaults, "prompt": "x", "evaluation": "clip", "clip_model": f" {tiny_clip} "}
        v = harness.run_node(cls, **local)[0]["validation"]
        assert v["eval_steps_interval"] is None  # 0: every validation render
        assert v["pretrained_evaluation_model_name_or_path"] == str(tiny_clip)
        errors = import_module(harness.module_name() + ".trainer_core.errors")
        with pytest.raises(errors.ConfigError, match="pretrained_evaluation_model_name_or_path"):
            harness.run_node(cls, **{**defaults, "prompt": "x", "evaluation": "clip", "clip_model": "/no/such/clip"})
    finally:
        harness.uninstall()


def test_the_terminal_shows_one_line_per_evaluation():
    import io

    from trainer_core.events import TerminalSink

    out = io.StringIO()
    TerminalSink(out).emit("evaluation", step=4, clip_score=23.456, scores={"validation": 20.0, "blue": 26.912})
    assert out.getvalue().strip() == "evaluation: step 4 CLIP score 23.46 (validation 20.00, blue 26.91)"


def test_a_kandinsky5_video_run_scores_every_frame_of_its_validation_clip(tiny_clip, tmp_path, monkeypatch):
    from helpers.datasets import write_video_dataset

    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    model = build_tiny_kandinsky5_video(tmp_path / "k5v")
    data = write_video_dataset(tmp_path / "clips", {"a": "a red ball rolls right"}, frames=17, size=(48, 32))
    seen: list[int] = []
    score = ClipScorer.score

    def counting(self, images, prompt):
        seen.append(len(images))
        return score(self, images, prompt)

    monkeypatch.setattr(ClipScorer, "score", counting)
    spec = build_spec(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"model_family": "kandinsky5-video", "pretrained_model_name_or_path": str(model)},
            "lora": {"lora_rank": 4, "lora_alpha": 8},
            "training": {"max_train_steps": 1, "mixed_precision": "no", "base_model_default_dtype": "fp32",
                         "gradient_checkpointing": False, "seed": 0},  # fmt: skip
            "validation": {"validation_prompt": "a red ball rolls right", "validation_resolution": "48x32",
                           "validation_num_inference_steps": 2, "validation_num_video_frames": 17,
                           "validation_disable_unconditional": True, "evaluation_type": "clip",
                           "pretrained_evaluation_model_name_or_path": str(tiny_clip)},  # fmt: skip
            "datasets": [
                {"id": "clips", "dataset_type": "video", "instance_data_dir": str(data), "resolution": 32,
                 "resolution_type": "pixel", "video": {"num_frames": 17}},
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "te")},
            ],  # fmt: skip
        }
    )
    sink = ListSink()
    Trainer(spec, sink).run()
    assert [e["step"] for e in sink.of("evaluation")] == [0, 1]
    assert seen == [17, 17]  # the mean over all 17 frames of each validation clip


def test_the_node_forwards_each_evaluation_to_the_chart_and_the_status_line(tmp_path):
    from importlib import import_module

    from comfy_stub import harness

    harness.install(tmp_path / "comfy")
    try:
        harness.load_pack()
        import server

        monitor = import_module(harness.module_name() + ".nodes.train_monitor").TrainMonitor("9", total=4)
        earlier = [{"step": 0, "clip_score": 20.0, "scores": {"validation": 20.0}}]
        monitor.announce(tmp_path / "run", [[1, 0.5]], "resume", earlier)  # a resumed run's scores, from disk
        (started,) = server.PromptServer.instance.of("comfyui-tuner.started")
        assert started["evaluations"] == earlier
        monitor.handle({"type": "evaluation", "step": 2, "clip_score": 23.456, "scores": {"validation": 23.456}})
        (sent,) = server.PromptServer.instance.of("comfyui-tuner.evaluation")
        assert sent == {"node": "9", "step": 2, "clip_score": 23.456, "scores": {"validation": 23.456}}
        assert server.PromptServer.instance.of("comfyui-tuner.status")[-1]["text"] == "CLIP score 23.46 at step 2"
        assert [e["step"] for e in monitor.evaluations] == [0, 2]
    finally:
        harness.uninstall()
