"""Record the fixture the browser check replays: one real Train LoRA run's websocket messages.

Runs the Train LoRA node (the real training child, on the tiny random Lumina 2) against the
ComfyUI stand-in of ``tests/comfy_stub``, keeps every ``comfyui-tuner.*`` message the node sent, in
order, together with those of ComfyUI's own messages that its frontend draws on the node
(``progress_text``, a progress-bar preview ``b_preview``, and last the ``executed`` message with the
node's ui output), and copies the validation images those messages point at, laid out as ComfyUI's
output folder (``/view?type=output&subfolder=S&filename=F`` serves ``output/S/F``)::

    /work/venv/bin/python tests/browser/record_events.py      # rewrites tests/browser/fixture/

About half a minute on 2 CPU cores. Nothing in it is random between runs but the clock: the
messages carry no timestamps, and the run's output folder is written relative to ComfyUI's base.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
for path in (TESTS, TESTS.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from comfy_stub import harness  # noqa: E402
from helpers.datasets import write_dataset  # noqa: E402

FIXTURE = HERE / "fixture"
NODE_ID = "7"
STEPS = 24
FRONTEND_DRAWN = {"progress_text", "b_preview"}  # ComfyUI's messages that its frontend draws on the node


def refs(name: str, data: dict) -> list[dict]:
    """The image files a message points at."""
    if name.endswith((".validation", ".done")):
        return list(data.get("images") or [])
    if name == "executed":
        output = data["output"]
        return list(output.get("images") or []) + [r for s in output.get("comfyui_tuner") or [] for r in s["images"]]
    return []


def record(out: Path = FIXTURE) -> list[list]:
    from trainer_core.testing.tiny import build_tiny_lumina2

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "comfy"
        harness.install(base)
        try:
            _, nodes = harness.load_pack()
            import server

            def run(node_id: str, unique_id: str = "1", **inputs):
                cls = nodes[node_id]
                return harness.run_node(cls, unique_id=unique_id, **{**harness.schema_defaults(cls), **inputs})

            model = build_tiny_lumina2(Path(tmp) / "models")
            captions = {"a": "a red circle", "b": "a blue circle", "c": "a green circle", "d": "a yellow circle"}
            data = write_dataset(Path(tmp) / "data", captions)
            (validation,) = run(
                "TunerValidationSettings",
                prompt="a red circle",
                resolution="64x64",
                steps=2,
                every_n_steps=8,
                base_model_samples=True,
            )
            result = run(
                "TunerTrainLoRA",
                unique_id=NODE_ID,
                model=run("TunerLoadLumina2", repo_id=str(model))[0],
                dataset=run("TunerBuildDataset", folder=str(data), resolution=64.0)[0],
                validation=validation,
                steps=STEPS,
                rank=4,
                learning_rate=5e-3,
                seed=1,
                checkpoint_every=12,
                name="browser",
            )
            messages = [
                [name, data]
                for name, data, _ in server.PromptServer.instance.messages
                if name.startswith("comfyui-tuner.") or (name in FRONTEND_DRAWN and data.get("node") == NODE_ID)
            ]
            shown = result.ui if isinstance(result.ui, dict) or result.ui is None else result.ui.as_dict()
            messages.append(["executed", {"node": NODE_ID, "output": shown or {}}])  # what the executor sends
            text = json.dumps(messages, indent=1).replace(str(base.resolve()), "<comfyui>")
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            (out / "events.json").write_text(text + "\n")
            for name, data in messages:
                for ref in refs(name, data):
                    source = base / ref["type"] / ref["subfolder"] / ref["filename"]
                    target = out / ref["type"] / ref["subfolder"] / ref["filename"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(source, target)
        finally:
            harness.uninstall()
    return json.loads(text)


if __name__ == "__main__":
    recorded = record()
    names = [name for name, _ in recorded]
    print(f"{len(recorded)} messages ({', '.join(sorted(set(names)))}) -> {FIXTURE}")  # noqa: T201
