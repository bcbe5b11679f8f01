"""Cache Embeds and Kandinsky 5 image training through the nodes, with the real child process.

One tiny Kandinsky 5 T2I model serves the module. The main test walks the graph of DESIGN.md:
Load Kandinsky5 Flavour -> Build Dataset -> Cache Embeds -> Train LoRA. Caching encodes every
caption and image once, a second run encodes nothing, and Train LoRA then finds everything cached
and trains 2 steps into a ComfyUI-format LoRA with Kandinsky 5 module names. Cancel and a failing
child are covered on the caching node; settings the engine refuses never start a child.
"""

from __future__ import annotations

import json
import os
import re
from importlib import import_module
from pathlib import Path

import pytest
from comfy_stub import harness
from helpers.datasets import write_dataset, write_video_dataset

from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily

LORA_KEY = re.compile(r"^diffusion_model\.(?P<module>[\w.]+?)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")


@pytest.fixture(scope="module")
def tiny_k5(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))


@pytest.fixture(scope="module")
def tiny_k5v(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    return build_tiny_kandinsky5_video(tmp_path_factory.mktemp("k5v"))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, nodes = harness.load_pack()
    yield nodes
    harness.uninstall()


@pytest.fixture
def comfy(pack, tmp_path, monkeypatch):
    """A fresh ComfyUI tree; every child started by Cache Embeds or Train LoRA is recorded."""
    recorder = harness.install(tmp_path / "comfy")
    import server

    workers = []
    cache_nodes = import_module(harness.module_name() + ".nodes.cache_nodes")
    train_run = import_module(harness.module_name() + ".nodes.train_run")

    def recording(original):
        def start(*args, **kwargs):
            worker = original(*args, **kwargs)
            workers.append(worker)
            return worker

        return start

    monkeypatch.setattr(cache_nodes, "WorkerProcess", recording(cache_nodes.WorkerProcess))
    monkeypatch.setattr(train_run, "WorkerProcess", recording(train_run.WorkerProcess))
    return {"nodes": pack, "recorder": recorder, "server": server.PromptServer.instance, "workers": workers}


def run(comfy, node_id: str, unique_id: str = "1", **inputs):
    cls = comfy["nodes"][node_id]
    return harness.run_node(cls, unique_id=unique_id, **{**harness.schema_defaults(cls), **inputs})


def graph(comfy, tmp_path, model_path: Path, **loader) -> dict:
    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle drawn on paper"})
    return {
        "model": run(comfy, "TunerLoadKandinsky5Flavour", repo_id=str(model_path), **loader)[0],
        "dataset": run(comfy, "TunerBuildDataset", folder=str(data), resolution=64.0)[0],
        "validation": run(
            comfy,
            "TunerValidationSettings",
            prompt="a green square",
            resolution="64x64",
            steps=1,
            base_model_samples=False,
        )[0],
    }


def counts(summary: str) -> dict[str, tuple[int, int, int]]:
    """'captions: 4 entries, 4 encoded, 0 reused' lines -> {what: (entries, encoded, reused)}."""
    found = re.findall(r"(\w+): (\d+) entries, (\d+) encoded, (\d+) reused", summary)
    return {what: (int(a), int(b), int(c)) for what, a, b, c in found}


def texts(comfy, node: str) -> list[str]:
    """The node's status lines: ComfyUI's progress text (Cache Embeds), or our extension's (Train LoRA)."""
    sent = comfy["server"].of("progress_text") + comfy["server"].of("comfyui-tuner.status")
    return [m["text"] for m in sent if m["node"] == node]


def test_cache_embeds_then_train_lora_reuses_every_entry_and_writes_a_kandinsky5_lora(comfy, tiny_k5, tmp_path):
    import comfy.model_management as mm

    inputs = graph(comfy, tmp_path, tiny_k5, lora_targets="attention+ffn")
    cache_inputs = {"model": inputs["model"], "dataset": inputs["dataset"], "validation": inputs["validation"]}

    first = run(comfy, "TunerCacheEmbeds", unique_id="4", **cache_inputs)
    passed, summary = first.args
    assert mm.calls[:2] == ["unload_all_models", "soft_empty_cache"]
    made = counts(summary)
    captions, images = made["captions"], made["images"]
    assert captions[0] >= 4 and captions[1] == captions[0]  # 2 captions, the empty one, the validation prompt
    assert images == (2, 2, 0)
    assert list(first.ui.as_dict()["text"]) == [summary]
    assert passed["datasets"] == inputs["dataset"]["datasets"]  # passed on unchanged, plus the marker
    assert Path(passed["cached"]["text_cache"]).is_dir()
    assert all(Path(p).is_dir() for p in passed["cached"]["latent_caches"])

    # the progress bar follows the cache events, one stage after the other, and is only on this node
    updates = comfy["recorder"].updates
    assert {u["node"] for u in updates} == {"4"}
    assert (updates[-1]["value"], updates[-1]["max"]) == (2, 2)  # latents, done
    assert any(t.startswith("caching captions") for t in texts(comfy, "4"))
    assert comfy["workers"][0].command()[3] == "cache" and comfy["workers"][0].returncode == 0
    assert "--watch-stdin" in comfy["workers"][0].command()  # an orphaned caching child stops too

    second = run(comfy, "TunerCacheEmbeds", unique_id="4", **cache_inputs)
    again = counts(second.args[1])
    assert again["captions"] == (captions[0], 0, captions[0]) and again["images"] == (2, 0, 2)
    assert second.args[0] == passed

    # Train LoRA on the cached datasets: every cache stage is complete from its first event
    out = run(
        comfy,
        "TunerTrainLoRA",
        unique_id="7",
        model=inputs["model"],
        dataset=passed,
        validation=inputs["validation"],
        steps=2,
        rank=4,
        learning_rate=1e-3,
        checkpoint_every=0,
    )
    stages = [re.match(r"caching (\w+): (\d+)/(\d+)", t) for t in texts(comfy, "7")]
    stages = [m.groups() for m in stages if m]
    assert {s for s, _, _ in stages} == {"text", "latents"}
    assert all(done == total for _, done, total in stages), stages  # nothing encoded by Train LoRA

    lora, lora_path = out.args[0], Path(out.args[1])
    assert lora_path.name.startswith("kandinsky5-image_lora_")  # the name widget is empty by default
    modules: dict[str, set[str]] = {}
    for key in lora:
        match = LORA_KEY.match(key)
        assert match, key
        modules.setdefault(match["module"], set()).add(match["part"])
    assert all(parts == {"lora_A.weight", "lora_B.weight", "alpha"} for parts in modules.values())
    leaves = {m.split(".", 2)[2] for m in modules}  # "<blocks>.<n>.<module path>"
    assert leaves == set(Kandinsky5ImageFamily.lora_presets["attention+ffn"])  # the loader's preset
    assert {m.split(".")[0] for m in modules} == {"text_transformer_blocks", "visual_transformer_blocks"}
    assert not any("modulation" in m for m in modules)
    from diffusers import Kandinsky5Transformer3DModel

    names = dict(Kandinsky5Transformer3DModel.from_pretrained(tiny_k5, subfolder="transformer").named_modules())
    assert all(m in names for m in modules)  # ComfyUI's K5 module tree is the same as diffusers'
    assert float(lora[next(k for k in lora if k.endswith(".alpha"))]) == 4.0
    assert len(comfy["workers"]) == 3


def test_cancel_stops_the_caching_child(comfy, tiny_k5, tmp_path):
    import comfy.model_management as mm

    inputs = graph(comfy, tmp_path, tiny_k5)
    comfy["recorder"].on_update = lambda update: mm.interrupt_current_processing(True)  # Cancel at once
    with pytest.raises(mm.InterruptProcessingException):
        run(comfy, "TunerCacheEmbeds", model=inputs["model"], dataset=inputs["dataset"])
    (worker,) = comfy["workers"]
    assert not worker.running and worker.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)
    assert "caching cancelled" in texts(comfy, "1")[-1]


def test_a_failing_caching_child_is_a_clear_error(comfy, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    inputs = graph(comfy, tmp_path, empty)
    worker_module = import_module(harness.module_name() + ".trainer_core.worker")
    with pytest.raises(worker_module.WorkerError) as failure:
        run(comfy, "TunerCacheEmbeds", model=inputs["model"], dataset=inputs["dataset"])
    message = str(failure.value)
    assert message.startswith("Caching could not start") and "not-a-model" in message and "How to fix" in message
    assert failure.value.returncode == 2 and not comfy["workers"][0].running


def test_settings_the_engine_refuses_start_no_child(comfy, tiny_k5, tmp_path):
    errors = import_module(harness.module_name() + ".trainer_core.errors")
    i2i = graph(comfy, tmp_path, tiny_k5, flavour="i2i-lite-sft")
    with pytest.raises(errors.ConfigError, match="i2i-lite-sft"):
        run(comfy, "TunerCacheEmbeds", model=i2i["model"], dataset=i2i["dataset"])
    with pytest.raises(errors.ConfigError, match="i2i-lite-sft"):
        run(comfy, "TunerTrainLoRA", model=i2i["model"], dataset=i2i["dataset"])
    with pytest.raises(errors.ConfigError, match="needs a dataset"):
        run(comfy, "TunerCacheEmbeds", model=i2i["model"])
    assert comfy["workers"] == []


def test_video_dataset_with_memory_options_and_tread_caches_then_trains_kandinsky5_video(comfy, tiny_k5v, tmp_path):
    """Video Options -> Build Dataset -> Cache Embeds (+ Offload/Quant) -> Train LoRA (+ TREAD), real children."""
    clips = write_video_dataset(tmp_path / "clips", {"a": "a ball rolls right", "b": "a square slides"}, frames=21)
    model = run(comfy, "TunerLoadKandinsky5Flavour", flavour="t2v-lite-sft-5s", repo_id=str(tiny_k5v))[0]
    video = run(comfy, "TunerVideoOptions", num_frames=17)[0]
    dataset = run(comfy, "TunerBuildDataset", folder=str(clips), resolution=32.0, resolution_type="pixel", video=video)[
        0
    ]
    memory = run(comfy, "TunerConfigureOffloadQuant", vae_enable_slicing=True, vae_enable_patch_conv=True)[0]

    cached = run(comfy, "TunerCacheEmbeds", unique_id="4", model=model, dataset=dataset, memory=memory)
    assert counts(cached.args[1])["videos"] == (2, 2, 0)  # both clips encoded by the caching child
    assert cached.args[0]["datasets"] == dataset["datasets"]

    tread = run(comfy, "TunerTreadRoute", selection_ratio=0.5, start_layer_idx=0, end_layer_idx=0)[0]
    out = run(
        comfy,
        "TunerTrainLoRA",
        unique_id="7",
        model=model,
        dataset=cached.args[0],
        memory=memory,
        tread=tread,
        steps=1,
        rank=4,
        learning_rate=1e-3,
        checkpoint_every=0,
    )
    stages = [re.match(r"caching (\w+): (\d+)/(\d+)", t) for t in texts(comfy, "7")]
    assert all(done == total for _, done, total in (m.groups() for m in stages if m))  # nothing encoded again
    lora_path = Path(out.args[1])
    assert lora_path.is_file() and lora_path.name.startswith("kandinsky5-video_lora_")
    assert out.args[0] and all(LORA_KEY.match(k) for k in out.args[0])
    (spec_file,) = (tmp_path / "comfy" / "output" / "comfyui-tuner").glob("kandinsky5-video_lora-*/spec.json")
    spec = json.loads(spec_file.read_text())
    assert spec["routing"]["tread_config"] == tread["routing"]["tread_config"]
    assert spec["memory"]["vae_enable_patch_conv"] and spec["memory"]["vae_enable_slicing"]
    (clip_set,) = [d for d in spec["datasets"] if d["dataset_type"] == "video"]
    assert clip_set["video"]["num_frames"] == 17
    assert [w.command()[3] for w in comfy["workers"]] == ["cache", "run"]


def test_the_summary_says_when_latents_are_left_to_training(comfy):
    cache_nodes = import_module(harness.module_name() + ".nodes.cache_nodes")
    cached = cache_nodes.CacheOutcome(text={"total": 4, "encoded": 4}, latents={"total": 3, "encoded": 3}, seconds=1.0)
    assert "images: 3 entries, 3 encoded, 0 reused" in cached.summary()
    skipped = cache_nodes.CacheOutcome(
        text={"total": 4, "encoded": 0}, latents={"total": 3, "encoded": 0, "skipped": True}, seconds=0.5
    )
    assert "images: 3 entries, not cached (vae_cache_disable: encoded while training)" in skipped.summary()
