"""The pack in a real ComfyUI: opt-in, ``pytest -k comfyui`` with ``COMFYUI_DIR`` set.

Skipped unless ``COMFYUI_DIR`` points at a ComfyUI checkout (kept outside this repository);
``COMFYUI_PYTHON`` is the interpreter that has ComfyUI's requirements (default: this one). The test
starts ``main.py --cpu`` on a free port with ``--base-directory`` in a temp folder whose
``custom_nodes/`` links this pack, waits for ``/object_info``, checks that our nodes are there, then
queues both example workflows converted to API format (as the frontend does, from ``/object_info``),
trained on the tiny models, and waits for each in ``/history``.

What cannot run with tiny models is swapped, everything else is the example as shipped:

- ComfyUI's text encoders (Gemma 2 2B, Qwen2.5-VL 7B) have fixed sizes, so the text-encoding and
  sampling branch is replaced by ``ModelSave`` of the LoRA-patched model, next to a ``ModelSave`` of
  the unpatched one: saving loads the model with its patches applied.
- ComfyUI's checkpoint detection knows only the real model sizes, so ``UNETLoader`` is replaced by a
  test node in a helper pack that builds ComfyUI's own model classes (``NextDiT``, ``Kandinsky5``)
  at the tiny models' shapes: random weights for Lumina 2, the tiny transformer's diffusers state
  dict loaded strictly for Kandinsky 5 (ComfyUI's module names are diffusers').

Then: every LoRA key was loaded (no "lora key not loaded" in the server log), exactly the LoRA's
weights differ between the two saved models, and Cache Embeds reported its entries.

The Kandinsky 5 T2V example is queued with its training half only (Video Options, Cache Embeds,
int8-quanto, TREAD, 17-frame validation clips) on the tiny video model: ComfyUI never loads that
model, so no sampling branch is swapped in. No traceback in the server log may pass through this pack.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers.datasets import write_dataset, write_video_dataset
from safetensors import safe_open

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
PACK_DIR = Path(__file__).resolve().parent.parent
PACK_FOLDER = "comfyui-tuner"
START_TIMEOUT = 240.0
PROMPT_TIMEOUT = 600.0
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to run the pack in a real ComfyUI"
)

HELPER_PACK = '''
"""Test helper for comfyui-tuner's real-ComfyUI test: tiny Lumina 2 / Kandinsky 5 models as MODEL."""
import torch
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils

MODELS = {MODELS}  # family -> (supported_models class, unet config, weights file or None)


class TunerE2ETinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (sorted(MODELS),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        kind, unet_config, weights = MODELS[family]
        torch.manual_seed(0)
        config = getattr(comfy.supported_models, kind)(dict(unet_config))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        net = model.diffusion_model
        if weights:  # the same module names as diffusers: load strictly
            net.load_state_dict(comfy.utils.load_torch_file(weights), strict=True)
        else:
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn_like(p) * 0.02)
        device = comfy.model_management.get_torch_device()
        return (comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device),)


# ComfyUI detects Lumina 2 from its keys and fills in the real model's heads, rope axes and
# feed-forward width for the two sizes it knows (comfy/model_detection.py): the tiny model's are
# given here, so "Load Diffusion Model" (and Fine-tune Model) load a tiny fine-tune's file as it is.
_detect_unet_config = comfy.model_detection.detect_unet_config


def _tiny_detect_unet_config(state_dict, key_prefix, *args, **kwargs):
    config = _detect_unet_config(state_dict, key_prefix, *args, **kwargs)
    tiny = MODELS["lumina2"][1]
    cap = state_dict.get(key_prefix + "cap_embedder.1.weight")
    if config and config.get("image_model") == "lumina2" and cap is not None and cap.shape[0] == tiny["dim"]:
        return dict(tiny)
    return config


comfy.model_detection.detect_unet_config = _tiny_detect_unet_config

NODE_CLASS_MAPPINGS = {"TunerE2ETinyModel": TunerE2ETinyModel}
'''


def tiny_lumina2_comfy_config(model_path: Path) -> dict[str, Any]:
    """ComfyUI's NextDiT config for the tiny diffusers Lumina 2 (same shapes)."""
    cfg = json.loads((model_path / "transformer" / "config.json").read_text())
    return {
        "image_model": "lumina2",
        "patch_size": cfg["patch_size"],
        "in_channels": cfg["in_channels"],
        "dim": cfg["hidden_size"],
        "cap_feat_dim": cfg["cap_feat_dim"],
        "n_layers": cfg["num_layers"],
        "n_refiner_layers": cfg["num_refiner_layers"],
        "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg["num_kv_heads"],
        "qk_norm": True,
        "multiple_of": cfg["multiple_of"],
        # diffusers widens the feed-forward from 4 * dim, ComfyUI from dim (its real-model multiplier is 4.0)
        "ffn_dim_multiplier": 4.0 * (cfg["ffn_dim_multiplier"] or 1.0),
        "axes_dims": list(cfg["axes_dim_rope"]),
        "axes_lens": list(cfg["axes_lens"]),
        "rope_theta": 10000.0,
    }


def tiny_k5_comfy_config(model_path: Path) -> dict[str, Any]:
    """ComfyUI's Kandinsky5 config for the tiny diffusers Kandinsky 5 image transformer.

    ComfyUI's checkpoint detection knows the real sizes only (it takes the rope axes, hence the head
    size, and the text widths from the model width), so the tiny one is described explicitly.
    """
    cfg = json.loads((model_path / "transformer" / "config.json").read_text())
    patch = list(cfg["patch_size"])
    return {
        "image_model": "kandinsky5",
        "in_visual_dim": cfg["in_visual_dim"],
        "out_visual_dim": cfg["out_visual_dim"],
        "in_text_dim": cfg["in_text_dim"],
        "in_text_dim2": cfg["in_text_dim2"],
        "time_dim": cfg["time_dim"],
        "model_dim": cfg["model_dim"],
        "ff_dim": cfg["ff_dim"],
        "visual_embed_dim": (cfg["in_visual_dim"] * (2 if cfg["visual_cond"] else 1) + int(cfg["visual_cond"]))
        * patch[0]
        * patch[1]
        * patch[2],
        "patch_size": patch,
        "num_text_blocks": cfg["num_text_blocks"],
        "num_visual_blocks": cfg["num_visual_blocks"],
        "axes_dims": list(cfg["axes_dims"]),
        "rope_scale_factor": [1.0, 1.0, 1.0],
    }


# ---------------------------------------------------------------------- HTTP
def http(url: str, data: dict | None = None, timeout: float = 30.0) -> Any:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


# ---------------------------------------------------------------------- workflow -> API prompt
def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(name, is the control-after-generate value) per stored widget value, in the frontend's order."""
    out = []
    for group in ("required", "optional"):
        order = (info.get("input_order") or {}).get(group) or list(info["input"].get(group) or {})
        for name in order:
            spec = info["input"][group][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            out.append((name, False))
            control = opts.get("control_after_generate")
            if kind == "INT" and (control or (control is None and name in ("seed", "noise_seed"))):
                out.append((name, True))
    return out


def to_api(workflow: dict, object_info: dict, keep: set[str]) -> dict[str, dict]:
    """The UI workflow as an API prompt, with only the node types in ``keep``."""
    links = {link[0]: link for link in workflow["links"]}
    kept = {n["id"]: n for n in workflow["nodes"] if n["type"] in keep}
    prompt: dict[str, dict] = {}
    for node_id, node in kept.items():
        info = object_info[node["type"]]
        slots = widget_names(info)
        values = node.get("widgets_values") or []
        assert len(values) == len(slots), f"{node['type']}: {values} for {slots}"
        inputs = {name: value for (name, control), value in zip(slots, values) if not control}
        for item in node["inputs"]:
            link = links.get(item["link"]) if item["link"] is not None else None
            if link is not None and link[1] in kept:
                inputs[item["name"]] = [str(link[1]), link[2]]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def set_inputs(prompt: dict, class_type: str, **values: Any) -> str:
    (node_id,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    prompt[node_id]["inputs"].update(values)
    return node_id


def widget_defaults(comfyui: dict, class_type: str) -> dict[str, Any]:
    """A freshly added node's widget values, from /object_info (a combo's first option)."""
    out = {}
    for name, spec in (comfyui["object_info"][class_type]["input"].get("required") or {}).items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
        if kind == "COMBO" or isinstance(kind, list):
            out[name] = opts.get("default", (opts.get("options") or kind)[0])
        elif kind in WIDGET_TYPES:
            out[name] = opts.get("default")
    return out


def node_id_of(prompt: dict, class_type: str) -> str:
    (node_id,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return node_id


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def tiny_k5(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))


@pytest.fixture(scope="module")
def tiny_k5_video(tmp_path_factory) -> Path:
    """The tiny Kandinsky 5 T2V pipeline (diffusers layout): only the trainer loads it, ComfyUI never does."""
    from trainer_core.testing.tiny import build_tiny_kandinsky5_video

    return build_tiny_kandinsky5_video(tmp_path_factory.mktemp("k5v"))


@pytest.fixture(scope="module")
def tiny_k5_i2i(tmp_path_factory) -> Path:
    """The tiny Kandinsky 5 I2I pipeline, built by ComfyUI's Python so that its tokenizer folder holds the
    real Qwen2VLProcessor (transformers builds it only where torchvision imports, as in ComfyUI installs)."""
    root = tmp_path_factory.mktemp("k5i2i")
    code = (
        "import sys; from trainer_core.testing.tiny import build_tiny_kandinsky5_image as b; "
        "print(b(sys.argv[1], i2i=True))"
    )
    out = subprocess.run(
        [COMFYUI_PYTHON, "-c", code, str(root)], cwd=PACK_DIR, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        pytest.skip(f"could not build the tiny i2i model with {COMFYUI_PYTHON}: {out.stderr[-500:]}")
    folder = Path(out.stdout.strip().splitlines()[-1])
    if not (folder / "tokenizer" / "processor_config.json").exists():  # saved only with a real processor
        pytest.skip(f"{COMFYUI_PYTHON} has no working torchvision, which Kandinsky 5 i2i needs")
    return folder


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, tiny_lumina2, tiny_k5):
    from diffusers import Kandinsky5Transformer3DModel
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("comfyui-base")
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / PACK_FOLDER).symlink_to(PACK_DIR, target_is_directory=True)
    k5_file = base / "tiny_k5_transformer.safetensors"
    k5 = Kandinsky5Transformer3DModel.from_pretrained(tiny_k5, subfolder="transformer")
    save_file({k: v.contiguous() for k, v in k5.state_dict().items()}, str(k5_file))
    models = {
        "lumina2": ("Lumina2", tiny_lumina2_comfy_config(tiny_lumina2), None),
        "kandinsky5": ("Kandinsky5", tiny_k5_comfy_config(tiny_k5), str(k5_file)),
    }
    helper = nodes_dir / "tuner_e2e_helpers"
    helper.mkdir()
    (helper / "__init__.py").write_text(HELPER_PACK.replace("{MODELS}", repr(models)))

    port = free_port()
    log = base / "server.log"
    cmd = [
        COMFYUI_PYTHON,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_tail(log)}")
            try:
                info = http(f"{url}/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        if info is None:
            pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT:.0f} s:\n{log_tail(log)}")
        yield {"url": url, "log": log, "base": base, "object_info": info, "lumina2": tiny_lumina2, "k5": tiny_k5}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queue(comfyui: dict, prompt: dict) -> dict:
    """Queue ``prompt`` and return its /history entry once finished (fails with the log on error)."""
    answer = http(f"{comfyui['url']}/prompt", {"prompt": prompt, "client_id": "comfyui-tuner-e2e"})
    assert not answer.get("node_errors"), answer
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:
        history = http(f"{comfyui['url']}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") == "success":
                return entry
            pytest.fail(f"prompt failed: {json.dumps(entry['status'], indent=1)[:4000]}\n{log_tail(comfyui['log'])}")
        time.sleep(1.0)
    pytest.fail(f"prompt did not finish within {PROMPT_TIMEOUT:.0f} s:\n{log_tail(comfyui['log'])}")


def saved_model(base: Path, prefix: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    (path,) = sorted((base / "output" / "diffusion_models").glob(f"{prefix}_*.safetensors"))
    return load_file(str(path))


# The tensor each ComfyUI adapter kind always writes per module (LoRA, LoKr, LoHa, LoCon, full).
ADAPTER_MARKERS = (".lora_A.weight", ".lokr_w1", ".lokr_w1_a", ".hada_w1_a", ".lora_down.weight", ".diff")


def lora_modules(lora_path: str) -> set[str]:
    """The ComfyUI modules an adapter file changes, whatever the adapter kind."""
    from safetensors.torch import load_file

    keys = load_file(lora_path)
    return {k[len("diffusion_model.") : -len(m)] for k in keys for m in ADAPTER_MARKERS if k.endswith(m)}


def our_tracebacks(log: str) -> list[str]:
    """The tracebacks in the server log that pass through this pack (ComfyUI's own, e.g. a missing
    torchaudio for comfy_extras' audio nodes, are not ours)."""
    head = "Traceback (most recent call last):"
    blocks = [head + block.split("\n\n", 1)[0] for block in log.split(head)[1:]]
    return [b for b in blocks if f"custom_nodes/{PACK_FOLDER}/" in b or str(PACK_DIR) in b]


def changed_modules(base: dict, patched: dict) -> set[str]:
    """Module names (ComfyUI's, without ``diffusion_model.``) whose saved weight differs."""
    out = set()
    for key, value in patched.items():
        if key in base and "diffusion_model." in key and not base[key].equal(value):
            out.add(key.split("diffusion_model.", 1)[1].removesuffix(".weight").removesuffix(".bias"))
    return out


# ---------------------------------------------------------------------- tests
def test_comfyui_lists_our_nodes(comfyui):
    from test_nodes import EXPECTED_NODES

    info = comfyui["object_info"]
    missing = sorted(set(EXPECTED_NODES) - set(info))
    assert not missing, f"not in /object_info: {missing}\n{log_tail(comfyui['log'])}"
    for node_id, category in EXPECTED_NODES.items():
        assert info[node_id]["category"] == category
        assert info[node_id]["python_module"] == f"custom_nodes.{PACK_FOLDER}"
    assert "IMPORT FAILED" not in "\n".join(
        line for line in comfyui["log"].read_text().splitlines() if PACK_FOLDER in line
    )
    flavours = info["TunerLoadKandinsky5Flavour"]["input"]["required"]["flavour"]
    assert "t2i-lite-sft" in (flavours[1].get("options") if flavours[0] == "COMBO" else flavours[0])


def test_comfyui_runs_the_lumina2_workflow_and_the_lora_loads(comfyui, tmp_path):
    workflow = json.loads((PACK_DIR / "workflows" / "Lumina 2 LoRA, train then sample.json").read_text())
    keep = {
        "TunerLoadLumina2",
        "TunerBuildDataset",
        "TunerValidationSettings",
        "TunerOptimizerSettings",
        "TunerTrainLoRA",
        "TunerLossGraph",
        "PreviewImage",
        "TunerApplyTrainedLoRA",
        "ModelSamplingAuraFlow",
        "UNETLoader",
    }
    prompt = to_api(workflow, comfyui["object_info"], keep)
    unet = node_id_of(prompt, "UNETLoader")
    prompt[unet] = {"class_type": "TunerE2ETinyModel", "inputs": {"family": "lumina2"}}
    data = write_dataset(tmp_path / "lumina-data", {"a": "tnr_cat, a red circle", "b": "tnr_cat, a blue circle"})
    set_inputs(prompt, "TunerLoadLumina2", repo_id=str(comfyui["lumina2"]))
    set_inputs(prompt, "TunerBuildDataset", folder=str(data), resolution=64.0)
    from trainer_core.testing.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")  # issue 18: CLIP evaluation of the samples, through the node
    set_inputs(
        prompt, "TunerValidationSettings", resolution="64x64", steps=1, every_n_steps=0, evaluation="clip",
        clip_model=str(clip),
    )  # fmt: skip
    set_inputs(prompt, "TunerOptimizerSettings", lr_scheduler="constant", lr_warmup_steps=0)
    train = set_inputs(
        prompt, "TunerTrainLoRA", steps=2, rank=4, learning_rate=5e-3, checkpoint_every=0, name="e2e_lumina2"
    )
    sampling = node_id_of(prompt, "ModelSamplingAuraFlow")
    prompt["900"] = {
        "class_type": "ModelSave",
        "inputs": {"model": [sampling, 0], "filename_prefix": "diffusion_models/lumina_lora"},
    }
    prompt["901"] = {
        "class_type": "ModelSave",
        "inputs": {"model": [unet, 0], "filename_prefix": "diffusion_models/lumina_base"},
    }

    entry = queue(comfyui, prompt)
    log = comfyui["log"].read_text()
    assert "lora key not loaded" not in log
    # the run's summary for the extension's bounded area; no "images", which the frontend would stack under the node
    (summary,) = entry["outputs"][train]["comfyui_tuner"]
    assert summary["images"] and summary["steps"] == 2 and "images" not in entry["outputs"][train]
    lora_files = sorted((comfyui["base"] / "models" / "loras" / PACK_FOLDER).glob("e2e_lumina2_*_comfyui.safetensors"))
    assert len(lora_files) == 1
    modules = lora_modules(str(lora_files[0]))
    assert modules and all(m.endswith(("attention.qkv", "attention.out")) for m in modules)
    changed = changed_modules(saved_model(comfyui["base"], "lumina_base"), saved_model(comfyui["base"], "lumina_lora"))
    assert changed == modules  # every LoRA module patched, nothing else touched
    # the base model and the trained one were CLIP-scored, and the run's last checkpoint keeps both scores
    states = [p for p in comfyui["base"].glob("**/checkpoints/step-2/state.json") if "e2e_lumina2" in str(p)]
    (state,) = [json.loads(p.read_text()) for p in states]
    assert [e["step"] for e in state["evaluations"]] == [0, 2]


def test_comfyui_runs_the_lumina2_full_fine_tune_workflow_and_loads_the_model(comfyui, tmp_path):
    from safetensors.torch import load_file

    workflow = json.loads((PACK_DIR / "workflows" / "Lumina 2 full fine-tune, train then sample.json").read_text())
    keep = {
        "TunerLoadLumina2",
        "TunerBuildDataset",
        "TunerValidationSettings",
        "TunerOptimizerSettings",
        "TunerFinetuneModel",
        "TunerLossGraph",
        "PreviewImage",
        "ModelSamplingAuraFlow",
    }
    prompt = to_api(workflow, comfyui["object_info"], keep)
    data = write_dataset(tmp_path / "lumina-data", {"a": "tnr_cat, a red circle", "b": "tnr_cat, a blue circle"})
    set_inputs(prompt, "TunerLoadLumina2", repo_id=str(comfyui["lumina2"]))
    set_inputs(prompt, "TunerBuildDataset", folder=str(data), resolution=64.0)
    set_inputs(prompt, "TunerValidationSettings", resolution="64x64", steps=1, every_n_steps=0)
    set_inputs(prompt, "TunerOptimizerSettings", lr_scheduler="constant", lr_warmup_steps=0)
    train = set_inputs(prompt, "TunerFinetuneModel", steps=2, learning_rate=1e-3, checkpoint_every=0, name="e2e_full")
    sampling = node_id_of(prompt, "ModelSamplingAuraFlow")
    prompt["900"] = {
        "class_type": "ModelSave",
        "inputs": {"model": [sampling, 0], "filename_prefix": "diffusion_models/lumina_full"},
    }

    entry = queue(comfyui, prompt)
    (summary,) = entry["outputs"][train]["comfyui_tuner"]
    assert summary["steps"] == 2 and summary["model_name"].startswith(f"{PACK_FOLDER}/e2e_full_")
    folder = comfyui["base"] / "models" / "diffusion_models" / PACK_FOLDER
    (model_file,) = sorted(folder.glob("e2e_full_*_comfyui.safetensors"))
    assert summary["model_path"] == str(model_file)
    # ComfyUI loaded the file as its own Lumina 2 (NextDiT), every tensor as written
    written = load_file(str(model_file))
    saved = saved_model(comfyui["base"], "lumina_full")
    loaded = {k.split("diffusion_model.", 1)[1]: v for k, v in saved.items() if "diffusion_model." in k}
    assert set(loaded) == set(written)
    assert all(loaded[k].float().equal(v.float()) for k, v in written.items())


K5_DEFAULT_TARGETS = {
    f"{a}_attention.{layer}" for a in ("self", "cross") for layer in ("to_query", "to_key", "to_value", "out_layer")
} | {"feed_forward.in_layer", "feed_forward.out_layer"}


def test_comfyui_runs_the_kandinsky5_workflow_with_cache_embeds(comfyui, tmp_path):
    workflow = json.loads((PACK_DIR / "workflows" / "Kandinsky 5 image LoRA, train then sample.json").read_text())
    keep = {
        "TunerLoadKandinsky5Flavour",
        "TunerBuildDataset",
        "TunerCacheEmbeds",
        "TunerOptimizerSettings",
        "TunerAdapterSettings",
        "TunerTrainLoRA",
        "TunerLossGraph",
        "UNETLoader",
        "TunerApplyTrainedLoRA",
        "ModelSamplingSD3",
    }
    prompt = to_api(workflow, comfyui["object_info"], keep)
    assert prompt[node_id_of(prompt, "TunerAdapterSettings")]["inputs"]["adapter_type"] == "LoKr"  # the template's
    data = write_dataset(tmp_path / "k5-data", {"a": "tnr_cat, a red circle", "b": "tnr_cat, a blue circle"})
    set_inputs(prompt, "TunerLoadKandinsky5Flavour", repo_id=str(comfyui["k5"]))
    set_inputs(prompt, "TunerBuildDataset", folder=str(data), resolution=64.0)
    set_inputs(prompt, "TunerOptimizerSettings", lr_scheduler="constant", lr_warmup_steps=0)
    cache = node_id_of(prompt, "TunerCacheEmbeds")
    set_inputs(prompt, "TunerTrainLoRA", steps=2, rank=4, learning_rate=5e-3, checkpoint_every=0, name="e2e_k5")
    unet = node_id_of(prompt, "UNETLoader")
    prompt[unet] = {"class_type": "TunerE2ETinyModel", "inputs": {"family": "kandinsky5"}}
    sampling = node_id_of(prompt, "ModelSamplingSD3")
    prompt["900"] = {
        "class_type": "ModelSave",
        "inputs": {"model": [sampling, 0], "filename_prefix": "diffusion_models/k5_lora"},
    }
    prompt["901"] = {
        "class_type": "ModelSave",
        "inputs": {"model": [unet, 0], "filename_prefix": "diffusion_models/k5_base"},
    }

    entry = queue(comfyui, prompt)
    assert "lora key not loaded" not in comfyui["log"].read_text()
    (summary,) = entry["outputs"][cache]["text"]
    assert "images: 2 entries, 2 encoded, 0 reused" in summary
    lora_files = sorted((comfyui["base"] / "models" / "loras" / PACK_FOLDER).glob("e2e_k5_*_comfyui.safetensors"))
    with safe_open(str(lora_files[0]), "pt") as f:
        assert f.metadata()["comfyui_tuner.adapter"] == "lokr"
    modules = lora_modules(str(lora_files[0]))
    # the image family's default targets: the authors' attention+ffn set (issue 14, item 6)
    assert modules and all(".".join(m.split(".")[-2:]) in K5_DEFAULT_TARGETS for m in modules), sorted(modules)
    assert any(m.endswith("feed_forward.in_layer") for m in modules) and any(m.endswith(".out_layer") for m in modules)
    changed = changed_modules(saved_model(comfyui["base"], "k5_base"), saved_model(comfyui["base"], "k5_lora"))
    assert changed == modules


def test_comfyui_runs_the_kandinsky5_video_t2v_training_chain(comfyui, tiny_k5_video, tmp_path):
    """The T2V example's training half: Video Options, Cache Embeds, int8-quanto, TREAD and video validation."""
    path = PACK_DIR / "workflows" / "Kandinsky 5 video LoRA (text to video), train then sample.json"
    workflow = json.loads(path.read_text())
    keep = {
        "TunerLoadKandinsky5Flavour",
        "TunerVideoOptions",
        "TunerBuildDataset",
        "TunerCacheEmbeds",
        "TunerConfigureOffloadQuant",
        "TunerTreadRoute",
        "TunerValidationSettings",
        "TunerValidationVideoOptions",
        "TunerTrainLoRA",
        "TunerLossGraph",
        "PreviewImage",  # shows Train LoRA's validation_images output (the frame strips)
    }
    prompt = to_api(workflow, comfyui["object_info"], keep)
    assert {v["class_type"] for v in prompt.values()} == keep  # the example still has the whole training half
    data = write_video_dataset(
        tmp_path / "k5v-data", {"a": "tnr_motion, a square slides right", "b": "tnr_motion, a square drifts"}
    )
    set_inputs(prompt, "TunerLoadKandinsky5Flavour", repo_id=str(tiny_k5_video))
    video = set_inputs(prompt, "TunerVideoOptions", num_frames=5)
    set_inputs(prompt, "TunerBuildDataset", folder=str(data), resolution=32.0, resolution_type="pixel")
    memory = set_inputs(prompt, "TunerConfigureOffloadQuant", base_model_precision="int8-quanto")
    tread = set_inputs(prompt, "TunerTreadRoute", selection_ratio=0.5, start_layer_idx=0, end_layer_idx=-1)
    set_inputs(prompt, "TunerValidationSettings", resolution="32x32", steps=1, every_n_steps=0)
    set_inputs(prompt, "TunerValidationVideoOptions", frames=17)
    cache = node_id_of(prompt, "TunerCacheEmbeds")
    train = set_inputs(
        prompt, "TunerTrainLoRA", steps=2, rank=4, learning_rate=5e-3, checkpoint_every=0, name="e2e_k5_t2v"
    )

    entry = queue(comfyui, prompt)
    outputs = entry["outputs"]
    assert "clips of 5 frames at 24 fps" in outputs[video]["text"][0]
    assert "base_model_precision: int8-quanto" in outputs[memory]["text"][0]
    assert "route 1: 0.5 of the tokens skip blocks 0..-1" in outputs[tread]["text"][0]
    (summary,) = outputs[cache]["text"]
    assert "videos: 2 entries, 2 encoded, 0 reused" in summary
    lora_files = sorted((comfyui["base"] / "models" / "loras" / PACK_FOLDER).glob("e2e_k5_t2v_*_comfyui.safetensors"))
    assert len(lora_files) == 1
    modules = lora_modules(str(lora_files[0]))
    # the video family's default targets ("attention+ffn"): q/k/v and out of every attention, and the feed-forward
    attention = {f"{a}_attention.{layer}" for a in ("self", "cross") for layer in ("to_query", "to_key", "to_value")}
    targets = attention | {"self_attention.out_layer", "cross_attention.out_layer"}
    targets |= {"feed_forward.in_layer", "feed_forward.out_layer"}
    visual_qkv = {f"visual_transformer_blocks.{i}.{name}" for i in (0, 1) for name in attention}
    assert visual_qkv <= modules, sorted(modules)
    assert all(
        m.split(".")[0] in ("text_transformer_blocks", "visual_transformer_blocks")
        and ".".join(m.split(".")[-2:]) in targets
        for m in modules
    ), sorted(modules)
    images = [image["filename"] for image in outputs[train]["comfyui_tuner"][0]["images"]]
    assert any(name.endswith("-frames.png") for name in images), images  # the validation clip's frame strip
    assert outputs[node_id_of(prompt, "PreviewImage")]["images"]
    tracebacks = our_tracebacks(comfyui["log"].read_text())
    assert not tracebacks, "\n\n".join(tracebacks)


def test_comfyui_runs_the_kandinsky5_i2i_workflow_on_reference_pairs(comfyui, tiny_k5_i2i, tmp_path):
    """The i2i example as shipped (stock ComfyUI cannot render i2i, so the graph has no sampler half):
    Build Dataset's reference_folder pairs the images, Qwen sees each reference (ComfyUI's Python has
    torchvision), and Train LoRA shows the trainer's own Kandinsky5I2IPipeline samples."""
    workflow = json.loads((PACK_DIR / "workflows" / "Kandinsky 5 image edit LoRA (i2i), train.json").read_text())
    keep = {n["type"] for n in workflow["nodes"]} - {"Note", "MarkdownNote"}  # frontend-only nodes
    prompt = to_api(workflow, comfyui["object_info"], keep)
    edits = write_dataset(tmp_path / "edits", {"a": "make it blue", "b": "turn it into a square"})
    refs = write_dataset(tmp_path / "refs", {"a": "", "b": ""}, size=(80, 64))
    set_inputs(prompt, "TunerLoadKandinsky5Flavour", repo_id=str(tiny_k5_i2i))
    set_inputs(prompt, "TunerBuildDataset", folder=str(edits), reference_folder=str(refs), resolution=64.0)
    set_inputs(prompt, "TunerValidationSettings", resolution="64x64", steps=1, every_n_steps=0)
    set_inputs(prompt, "TunerOptimizerSettings", lr_scheduler="constant", lr_warmup_steps=0)
    cache = node_id_of(prompt, "TunerCacheEmbeds")
    train = set_inputs(
        prompt, "TunerTrainLoRA", steps=2, rank=4, learning_rate=5e-3, checkpoint_every=0, name="e2e_i2i"
    )

    entry = queue(comfyui, prompt)
    outputs = entry["outputs"]
    assert "2 image pair(s)" in outputs[node_id_of(prompt, "TunerBuildDataset")]["text"][0]
    (summary,) = outputs[cache]["text"]
    assert "images: 4 entries, 4 encoded, 0 reused" in summary, summary  # two targets and their two references
    lora_files = sorted((comfyui["base"] / "models" / "loras" / PACK_FOLDER).glob("e2e_i2i_*_comfyui.safetensors"))
    assert len(lora_files) == 1 and lora_modules(str(lora_files[0]))
    images = [image["filename"] for image in outputs[train]["comfyui_tuner"][0]["images"]]
    assert any("validation-64x64" in name for name in images), images
    tracebacks = our_tracebacks(comfyui["log"].read_text())
    assert not tracebacks, "\n\n".join(tracebacks)


def test_comfyui_reports_a_node_error_under_the_nodes_display_name(comfyui):
    """Last in this file: it leaves a traceback through the pack in the server log on purpose."""
    prompt = {"1": {"class_type": "TunerTrainLoRA", "inputs": {**widget_defaults(comfyui, "TunerTrainLoRA")}}}
    answer = http(f"{comfyui['url']}/prompt", {"prompt": prompt, "client_id": "comfyui-tuner-e2e"})
    assert not answer.get("node_errors"), answer
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entry = http(f"{comfyui['url']}/history/{answer['prompt_id']}").get(answer["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the failing prompt did not finish:\n{log_tail(comfyui['log'])}")
    (error,) = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    # ComfyUI's own exception_type: the node's display name, not the pack's folder path + class
    assert error["exception_type"] == "Train LoRA", error["exception_type"]
    assert error["exception_message"].startswith("Train LoRA needs a model\nHow to fix:")
    assert error["node_type"] == "TunerTrainLoRA"  # the class name: the web extension retitles the dialog
