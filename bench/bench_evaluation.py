"""CLIP evaluation (``evaluation_type: clip``) against the validation render it scores, on the tiny Lumina 2.

One engine (``Trainer(spec)``; ``prepare()``, ``fill_caches()``, ``build_model()``) with the
validation prompt and a library prompt (``--prompts`` in all) at ``--px`` square,
``--steps`` sampling steps, and CLIP evaluation on every validation render. Each round calls
``Trainer.validate`` (render, write the PNGs, then score) and times the scoring part alone (the
``evaluate`` call: CLIP on the training device, the prompts' images and text through it, back to
the CPU); the render time is the rest. The figure is the median over ``--rounds`` of
(scoring time / render time) in the same round. The first scoring, which loads the CLIP model from
its folder, is timed separately.

CLIP: ``--clip tiny`` is the test model (``build_tiny_clip``: width 32, 2 layers, 32 px);
``--clip vit-l-14`` is a random CLIP with openai/clip-vit-large-patch14's geometry (ViT-L/14 at
224 px, text width 768, 12 layers; about 430 M parameters, 1.7 GB in fp32), built once into the
work folder: the cost of the real default model, without its weights.

Usage::

    python bench/bench_evaluation.py                  # well under a minute on 2 CPU cores
    python bench/bench_evaluation.py --clip vit-l-14  # a few minutes: builds a 1.7 GB random CLIP-L
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_overhead.py

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from trainer_core.events import ListSink  # noqa: E402
from trainer_core.spec import TrainSpec  # noqa: E402
from trainer_core.train import evaluation as clip_eval  # noqa: E402
from trainer_core.train.engine import Trainer  # noqa: E402


def build_clip_l(folder: Path) -> Path:
    """A random CLIP with ViT-L/14's geometry and the tiny tokenizer, saved like a Hub CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from trainer_core.testing.tiny import make_clip_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tok = make_clip_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # CLIP's defaults: 224 px, OpenAI mean/std
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", choices=("tiny", "vit-l-14"), default="tiny")
    ap.add_argument("--px", type=int, default=64, help="validation size (square)")
    ap.add_argument("--steps", type=int, default=30, help="validation sampling steps (the spec's default)")
    ap.add_argument("--prompts", type=int, default=2, help="validation prompts (each scored)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep models and data here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from helpers.datasets import write_dataset

    from trainer_core.testing.tiny import build_tiny_clip, build_tiny_lumina2

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "lumina2"
    if not (model / "model_index.json").is_file():
        model = build_tiny_lumina2(work)
    clip = build_tiny_clip(work / "clip-tiny") if args.clip == "tiny" else build_clip_l(work / "clip-vit-l-14")
    data = write_dataset(work / "data", {"a": "pixel art of a red circle", "b": "a blue one"})
    library = {f"p{i}": f"a shape number {i}" for i in range(1, args.prompts)}
    spec = TrainSpec.model_validate(
        {
            "output_dir": str(work / "out"),
            "model": {"model_family": "lumina2", "pretrained_model_name_or_path": str(model)},
            "training": {"max_train_steps": 1, "mixed_precision": "no", "base_model_default_dtype": "fp32",
                         "gradient_checkpointing": False, "seed": 0},  # fmt: skip
            "validation": {"validation_prompt": "pixel art of a red circle", "user_prompt_library": library,
                           "validation_resolution": f"{args.px}x{args.px}",
                           "validation_num_inference_steps": args.steps, "evaluation_type": "clip",
                           "pretrained_evaluation_model_name_or_path": str(clip)},  # fmt: skip
            "datasets": [
                {"id": "d", "instance_data_dir": str(data), "resolution": 64, "resolution_type": "pixel_area"},
                {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": str(work / "out" / "te")},
            ],
        }
    )
    t = Trainer(spec, ListSink(), device="cpu")
    t.prepare()
    t.fill_caches()
    t.build_model()

    scoring: list[float] = []
    real_evaluate = clip_eval.evaluate

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_evaluate(*a, **k)
        finally:
            scoring.append(time.perf_counter() - t0)

    clip_eval.evaluate = timed
    try:
        t0 = time.perf_counter()
        t.validate(0)  # the first: loads CLIP (timed apart), renders, scores
        first_total = time.perf_counter() - t0
        renders, scores, ratios = [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            t.validate(r + 1)
            total = time.perf_counter() - t0
            renders.append(total - scoring[-1])
            scores.append(scoring[-1])
            ratios.append(scoring[-1] / renders[-1])
    finally:
        clip_eval.evaluate = real_evaluate
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}",
        "torch": torch.__version__,
        "clip": args.clip,
        "clip_parameters": sum(p.numel() for p in t._scorer.model.parameters()),
        "validation": f"{args.prompts} prompts + unconditional, {args.px}px, {args.steps} steps (tiny Lumina 2)",
        "first_validation_with_clip_load_s": first_total,
        "median_render_s": statistics.median(renders),
        "median_scoring_s": statistics.median(scores),
        "median_ratio_scoring_to_render": statistics.median(ratios),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
