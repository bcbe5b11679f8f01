"""The example workflows load in ComfyUI: every node exists, every widget value fits, every link fits.

Our nodes are checked against their schemas (loaded through the ComfyUI stand-in). Stock nodes are
checked against the definitions below, read from ComfyUI 0.8's ``nodes.py``,
``comfy_extras/nodes_sd3.py`` and ``comfy_extras/nodes_model_advanced.py``: how many widget values
the frontend stores for them and the types of their sockets. ``Note`` is a frontend-only node.
Kandinsky 5 image sampling in stock ComfyUI (``comfy/supported_models.py`` ``Kandinsky5Image``,
``comfy_extras/nodes_kandinsky5.py``): a diffusion model through UNETLoader, Qwen2.5-VL + CLIP-L
through DualCLIPLoader type ``kandinsky5_image`` (its tokenizer adds the authors' image template), the
Flux VAE, 16-channel latents from EmptySD3LatentImage and the flow shift through ModelSamplingSD3.
Kandinsky 5 video (``Kandinsky5`` there, ``comfy_extras/nodes_kandinsky5.py``, ``nodes_hunyuan.py``,
``nodes_latent.py``, ``nodes_video.py``): DualCLIPLoader type ``kandinsky5`` (the video template), the
HunyuanVideo VAE, EmptyHunyuanLatentVideo for T2V, Kandinsky5ImageToVideo (+ ReplaceVideoLatentFrames
for the clean first frame) for I2V, shift 10, then CreateVideo and SaveVideo.

The widget order is the frontend's: required inputs, then optional ones, in schema order, with an
extra "control after generate" value after an INT that asks for one, or that is named ``seed`` or
``noise_seed`` and does not say (ComfyUI frontend ``useIntWidget``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_stub import harness

from trainer_core.families.kandinsky5_image import Kandinsky5ImageFamily
from trainer_core.families.kandinsky5_video import Kandinsky5VideoFamily

WORKFLOWS = sorted((harness.PACK_DIR / "workflows").glob("*.json"))

STOCK = {
    "UNETLoader": {"widgets": 2, "inputs": {}, "outputs": ["MODEL"]},
    "CLIPLoader": {"widgets": 3, "inputs": {}, "outputs": ["CLIP"]},
    "DualCLIPLoader": {"widgets": 4, "inputs": {}, "outputs": ["CLIP"]},
    "VAELoader": {"widgets": 1, "inputs": {}, "outputs": ["VAE"]},
    "CLIPTextEncode": {"widgets": 1, "inputs": {"clip": "CLIP"}, "outputs": ["CONDITIONING"]},
    "EmptySD3LatentImage": {"widgets": 3, "inputs": {}, "outputs": ["LATENT"]},
    "ModelSamplingAuraFlow": {"widgets": 1, "inputs": {"model": "MODEL"}, "outputs": ["MODEL"]},
    "ModelSamplingSD3": {"widgets": 1, "inputs": {"model": "MODEL"}, "outputs": ["MODEL"]},
    "KSampler": {
        "widgets": 7,
        "inputs": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
        "outputs": ["LATENT"],
    },
    "VAEDecode": {"widgets": 0, "inputs": {"samples": "LATENT", "vae": "VAE"}, "outputs": ["IMAGE"]},
    "SaveImage": {"widgets": 1, "inputs": {"images": "IMAGE"}, "outputs": []},
    "PreviewImage": {"widgets": 0, "inputs": {"images": "IMAGE"}, "outputs": []},
    "LoraLoaderModelOnly": {"widgets": 2, "inputs": {"model": "MODEL"}, "outputs": ["MODEL"]},
    "LoadImage": {"widgets": 2, "inputs": {}, "outputs": ["IMAGE", "MASK"]},
    "EmptyHunyuanLatentVideo": {"widgets": 4, "inputs": {}, "outputs": ["LATENT"]},
    "Kandinsky5ImageToVideo": {
        "widgets": 4,
        "inputs": {"positive": "CONDITIONING", "negative": "CONDITIONING", "vae": "VAE", "start_image": "IMAGE"},
        "outputs": ["CONDITIONING", "CONDITIONING", "LATENT", "LATENT"],
    },
    "ReplaceVideoLatentFrames": {
        "widgets": 1,
        "inputs": {"destination": "LATENT", "source": "LATENT"},
        "outputs": ["LATENT"],
    },
    "CreateVideo": {"widgets": 1, "inputs": {"images": "IMAGE", "audio": "AUDIO"}, "outputs": ["VIDEO"]},
    "SaveVideo": {"widgets": 3, "inputs": {"video": "VIDEO"}, "outputs": []},
    "Note": {"widgets": 1, "inputs": {}, "outputs": []},
    "MarkdownNote": {"widgets": 1, "inputs": {}, "outputs": []},
}
MULTILINE_STOCK = {"CLIPTextEncode": 1}  # text areas among the stock nodes' widgets
FOLDER_OF_LOADER = {  # where ComfyUI looks for each stock loader's files (models/<folder>)
    "UNETLoader": "diffusion_models",
    "CLIPLoader": "text_encoders",
    "DualCLIPLoader": "text_encoders",
    "VAELoader": "vae",
}
SAMPLERS = {"euler", "res_multistep", "dpmpp_2m"}
SCHEDULERS = {"simple", "normal", "beta", "sgm_uniform", "karras"}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, found = harness.load_pack()
    yield found
    harness.uninstall()


def widget_slots(cls) -> list[tuple[object, bool]]:
    """(input, is the control-after-generate value) for each widget value, in the frontend's order."""
    inputs = [i for i in cls.GET_SCHEMA().inputs if getattr(i, "is_widget", False)]
    ordered = [i for i in inputs if not i.optional] + [i for i in inputs if i.optional]
    slots = []
    for item in ordered:
        slots.append((item, False))
        control = getattr(item, "control_after_generate", None)
        if item.io_type == "INT" and (control or (control is None and item.id in ("seed", "noise_seed"))):
            slots.append((item, True))
    return slots


def check_value(node_type: str, item, value) -> None:
    where = f"{node_type}.{item.id} = {value!r}"
    kind = item.io_type
    if kind == "COMBO":
        assert value in item.options, where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if kind == "INT":
            assert float(value).is_integer(), where
        assert item.min is None or value >= item.min, where
        assert item.max is None or value <= item.max, where


def sockets(node_type: str, nodes: dict) -> tuple[dict[str, str], list[str]]:
    """(input name -> type, output types) of a node type."""
    if node_type in nodes:
        schema = nodes[node_type].GET_SCHEMA()
        ins = {i.id: i.io_type for i in schema.inputs}
        return ins, [o.io_type for o in schema.outputs]
    return STOCK[node_type]["inputs"], STOCK[node_type]["outputs"]


def kind_of(path: Path) -> str:
    """What a template trains, read from its nodes (the file name is the title the Templates dialog shows)."""
    types = {n["type"]: n for n in json.loads(path.read_text())["nodes"]}
    if "TunerImportSimpleTunerConfig" in types:
        return "simpletuner"
    if "TunerFinetuneModel" in types:
        return "lumina2-full" if "TunerLoadLumina2" in types else "k5-full"
    if "TunerLoadLumina2" in types:
        return "lumina2"
    flavour = types["TunerLoadKandinsky5Flavour"]["widgets_values"][0]
    return {"t2i": "k5-t2i", "i2i": "k5-i2i", "t2v": "k5-t2v", "i2v": "k5-i2v"}[flavour[:3]]


def test_there_is_a_workflow_per_family_and_one_from_simpletuner():
    kinds = sorted(kind_of(p) for p in WORKFLOWS)
    assert kinds == ["k5-i2i", "k5-i2v", "k5-t2i", "k5-t2v", "lumina2", "lumina2-full", "simpletuner"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_has_a_thumbnail(path: Path):
    """ComfyUI's Templates dialog shows workflows/<name>.jpg for workflows/<name>.json.

    Made by scripts/make_workflow_thumbnails.mjs (screenshots of the graph in ComfyUI's frontend); rerun
    it after changing a workflow.
    """
    from PIL import Image

    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"no {thumb.name}: run scripts/make_workflow_thumbnails.mjs"
    with Image.open(thumb) as im:
        im.verify()
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.width >= 256 and im.height >= 128, (im.format, im.size)


def test_every_thumbnail_belongs_to_a_workflow():
    thumbs = sorted((harness.PACK_DIR / "workflows").glob("*.jpg"))
    assert [t.with_suffix(".json") for t in thumbs] == WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_uses_existing_nodes_with_valid_widgets_and_links(nodes, path: Path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and wf["nodes"] and wf["links"]
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(by_id) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for node in wf["nodes"]:
        kind = node["type"]
        assert kind in nodes or kind in STOCK, f"{path.name}: unknown node type {kind}"
        values = node.get("widgets_values", [])
        if kind in nodes:
            slots = widget_slots(nodes[kind])
            assert len(values) == len(slots), f"{kind}: {len(values)} widget values for {len(slots)} widgets"
            for (item, is_control), value in zip(slots, values):
                if is_control:
                    assert value in ("fixed", "increment", "decrement", "randomize")
                else:
                    check_value(kind, item, value)
        else:
            assert len(values) == STOCK[kind]["widgets"], f"{kind}: {values}"
        ins, outs = sockets(kind, nodes)
        for item in node["inputs"]:
            assert ins.get(item["name"]) == item["type"], f"{kind} has no {item['type']} input {item['name']!r}"
        assert [o["type"] for o in node["outputs"]] == outs, kind
    if "KSampler" in {n["type"] for n in wf["nodes"]}:
        sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"]
        assert sampler[4] in SAMPLERS and sampler[5] in SCHEDULERS

    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = by_id[src]["outputs"][src_slot]
        into = by_id[dst]["inputs"][dst_slot]
        assert out["type"] == into["type"] == kind and link_id in out["links"] and into["link"] == link_id
    linked = {link[0] for link in wf["links"]}
    assert {i["link"] for n in wf["nodes"] for i in n["inputs"] if i["link"] is not None} == linked


I2I_WORKFLOW = next(p for p in WORKFLOWS if kind_of(p) == "k5-i2i")
FULL_WORKFLOWS = [p for p in WORKFLOWS if kind_of(p).endswith("-full")]
LORA_SAMPLING_WORKFLOWS = [p for p in WORKFLOWS if p != I2I_WORKFLOW and p not in FULL_WORKFLOWS]


def test_the_i2i_workflow_trains_on_reference_pairs_and_says_stock_comfyui_cannot_render_it(nodes):
    wf = json.loads(I2I_WORKFLOW.read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    assert by_type["TunerLoadKandinsky5Flavour"]["widgets_values"][0] == "i2i-lite-sft"
    inputs = [i.id for i in nodes["TunerBuildDataset"].define_schema().inputs if hasattr(i, "default")]
    values = dict(zip(inputs, by_type["TunerBuildDataset"]["widgets_values"]))
    assert values["reference_folder"] and values["folder"] != values["reference_folder"]
    assert "KSampler" not in by_type and "PreviewImage" in by_type  # the trainer's own (diffusers) samples
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "MarkdownNote")
    assert "no sampling half" in notes and "cannot run the Kandinsky 5 image-editing model" in notes
    # it talks only about what the graph has: no sampler, shift or guidance of a sampling half
    assert not any(word in notes for word in ("KSampler", "shift", "guidance", "sampling shift"))


@pytest.mark.parametrize("path", FULL_WORKFLOWS, ids=lambda p: p.name)
def test_the_full_fine_tune_workflow_samples_with_the_model_it_trained(nodes, path: Path):
    wf = json.loads(path.read_text())
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    assert not [link for link in wf["links"] if link[5] == "LORA_MODEL"]
    assert "UNETLoader" not in types.values()  # the model to sample is the fine-tuned one, not the base file
    (train,) = [i for i, t in types.items() if t == "TunerFinetuneModel"]
    model_links = [link for link in wf["links"] if link[1] == train and link[5] == "MODEL"]
    assert [types[link[3]] for link in model_links] == ["ModelSamplingAuraFlow"]
    aura = model_links[0][3]
    assert [types[link[3]] for link in wf["links"] if link[1] == aura] == ["KSampler"]
    assert "SaveImage" in types.values()
    clip = next(n for n in wf["nodes"] if n["type"] == "CLIPLoader")
    assert clip["widgets_values"][1] == "lumina2"
    positive = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode" and n["widgets_values"][0])
    assert " <Prompt Start> " in positive["widgets_values"][0]  # Lumina 2's system prompt, as in training
    steps, learning_rate = next(n for n in wf["nodes"] if n["id"] == train)["widgets_values"][:2]
    assert learning_rate == 1e-5 and steps > 0


@pytest.mark.parametrize("path", LORA_SAMPLING_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_trains_then_samples_with_the_lora(nodes, path: Path):
    wf = json.loads(path.read_text())
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    lora_links = [link for link in wf["links"] if link[5] == "LORA_MODEL"]
    assert lora_links and all(types[link[1]] == "TunerTrainLoRA" for link in lora_links)
    assert {types[link[3]] for link in lora_links} <= {"TunerApplyTrainedLoRA", "LoraModelLoader"}
    assert {"SaveImage", "SaveVideo"} & set(types.values()) and "KSampler" in types.values()
    positive = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode" and n["widgets_values"][0])
    if kind_of(path) in ("k5-t2v", "k5-i2v"):
        check_kandinsky5_video(wf, path, types)
    elif kind_of(path) == "k5-t2i":
        clip = next(n for n in wf["nodes"] if n["type"] == "DualCLIPLoader")
        assert clip["widgets_values"][2] == "kandinsky5_image"  # Qwen2.5-VL + CLIP-L, the authors' image template
        assert "<|im_start|>" not in positive["widgets_values"][0]  # ComfyUI adds the template itself
        shift = next(n for n in wf["nodes"] if n["type"] == "ModelSamplingSD3")["widgets_values"][0]
        assert shift == Kandinsky5ImageFamily.flavours["t2i-lite-sft"].options["sampling_shift"] == 3.0
        loader = next(n for n in wf["nodes"] if n["type"] == "TunerLoadKandinsky5Flavour")
        assert loader["widgets_values"][0] == Kandinsky5ImageFamily.default_flavour
        train = next(n["id"] for n in wf["nodes"] if n["type"] == "TunerTrainLoRA")
        into_train = {types[link[1]] for link in wf["links"] if link[3] == train}
        assert "TunerCacheEmbeds" in into_train  # Load -> Build Dataset -> Cache Embeds -> Train LoRA
        # a LoKr, as SimpleTuner's own Kandinsky 5 image examples, into Train LoRA's adapter input
        adapter = next(n for n in wf["nodes"] if n["type"] == "TunerAdapterSettings")
        assert adapter["widgets_values"][0] == "LoKr"
        (link,) = [link for link in wf["links"] if link[1] == adapter["id"]]
        train_node = next(n for n in wf["nodes"] if n["id"] == train)
        assert link[3] == train and train_node["inputs"][link[4]]["name"] == "adapter"
    else:
        clip = next(n for n in wf["nodes"] if n["type"] == "CLIPLoader")
        assert clip["widgets_values"][1] == "lumina2"
        assert " <Prompt Start> " in positive["widgets_values"][0]  # Lumina 2's system prompt, as in training


def check_kandinsky5_video(wf: dict, path: Path, types: dict[int, str]) -> None:
    """Train with every new node in the chain, then sample a clip the way stock ComfyUI runs K5 video."""
    nodes = wf["nodes"]

    def one(kind: str) -> dict:
        (node,) = [n for n in nodes if n["type"] == kind]
        return node

    def sources(node_id: int) -> set[str]:
        return {types[link[1]] for link in wf["links"] if link[3] == node_id}

    i2v = kind_of(path) == "k5-i2v"
    flavour = one("TunerLoadKandinsky5Flavour")["widgets_values"][0]
    assert flavour in Kandinsky5VideoFamily.flavours
    assert Kandinsky5VideoFamily.flavours[flavour].options["i2v"] is i2v
    assert sources(one("TunerBuildDataset")["id"]) == {"TunerVideoOptions"}
    frames = one("TunerVideoOptions")["widgets_values"][0]
    assert (frames - 1) % 4 == 0
    assert sources(one("TunerCacheEmbeds")["id"]) >= {"TunerBuildDataset", "TunerConfigureOffloadQuant"}
    assert sources(one("TunerTrainLoRA")["id"]) >= {"TunerCacheEmbeds", "TunerConfigureOffloadQuant", "TunerTreadRoute"}

    assert one("DualCLIPLoader")["widgets_values"][2] == "kandinsky5"  # the video template, Qwen2.5-VL + CLIP-L
    shift = one("ModelSamplingSD3")["widgets_values"][0]
    assert shift == Kandinsky5VideoFamily.flavours[flavour].options["sampling_shift"] == 10.0
    latent = one("Kandinsky5ImageToVideo" if i2v else "EmptyHunyuanLatentVideo")["widgets_values"]
    assert (latent[2] - 1) % 4 == 0 and latent[0] % 16 == 0 and latent[1] % 16 == 0
    if i2v:
        assert sources(one("Kandinsky5ImageToVideo")["id"]) >= {"LoadImage", "CLIPTextEncode", "VAELoader"}
        assert sources(one("ReplaceVideoLatentFrames")["id"]) == {"KSampler", "Kandinsky5ImageToVideo"}
    assert sources(one("SaveVideo")["id"]) == {"CreateVideo"}
    notes = " ".join(n["widgets_values"][0] for n in nodes if n["type"] == "MarkdownNote")
    assert "Limits of stock ComfyUI" in notes and "NABLA" in notes and "4k+1" in notes
    # validation clips: their length and rate come from Validation Video Options, fed into Validation Settings
    assert sources(one("TunerValidationSettings")["id"]) == {"TunerValidationVideoOptions"}
    assert (one("TunerValidationVideoOptions")["widgets_values"][0] - 1) % 4 == 0
