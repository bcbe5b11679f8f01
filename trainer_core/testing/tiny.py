"""Tiny, randomly initialised models of the real architectures, saved in diffusers layout.

Used by the demo and the tests: nothing can be downloaded, so we build a Lumina 2 pipeline
(Gemma2 text encoder, Flux-style VAE, Lumina2 DiT) with the real classes at toy widths, save it
with ``save_pretrained`` and load it back through exactly the code path that loads real weights.
Tokenizers are built from in-memory vocabularies (transformers 5 tokenizers accept ``vocab=``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_gemma_tokenizer():
    """Gemma-style tokenizer with byte fallback: every ASCII character is one token."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in range(33, 127):
        vocab[chr(c)] = len(vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)  # like the real Gemma tokenizer
    tok.padding_side = "right"
    return tok


def make_flux_vae():
    """AutoencoderKL shaped like FLUX.1's VAE (16 latent channels, 8x down), toy widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        norm_num_groups=8,
        act_fn="silu",
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()


def randomize_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Give zero-initialised weights small random values.

    The DiTs zero-initialise their modulation/gate layers, so a freshly built random model
    ignores every block and LoRA on attention gets exactly zero gradient. Trained checkpoints
    have non-zero gates; this makes a random tiny model behave like one.
    """
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and torch.count_nonzero(p) == 0 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def build_tiny_lumina2(root: str | Path, seed: int = 0) -> Path:
    """Write a tiny Lumina 2 pipeline (diffusers layout) under ``root`` and return its folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = make_gemma_tokenizer()
    te = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=64,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        hidden_size=48,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(8, 8, 8),
        axes_lens=(300, 64, 64),
        cap_feat_dim=32,
    )
    randomize_zero_init(transformer, seed=seed)
    pipe = Lumina2Pipeline(
        transformer=transformer,
        vae=make_flux_vae(),
        text_encoder=te,
        tokenizer=tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
    )
    out = Path(root) / "tiny-lumina2"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def make_qwen_tokenizer():
    """Byte-level Qwen2Tokenizer (one token per byte, no merges) with Qwen's chat special tokens.

    One token per byte keeps every Kandinsky 5 template longer than its crop index (41 / 55 / 129),
    so the crop never empties the sequence. It starts inside the system prompt here (the index is
    calibrated to the real Qwen vocabulary), which is fine for a random model.
    """
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for special in _QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(list(_QWEN_SPECIALS), special_tokens=True)
    return tok


def make_clip_tokenizer():
    """CLIP BPE tokenizer with single-byte symbols (plus their '</w>' forms) and no merges."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in real CLIP (pooling picks the argmax id)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA-only wheel next to a CPU torch raises RuntimeError, not ImportError
        return False
    return True


def build_tiny_kandinsky5_image(root: str | Path, seed: int = 0, i2i: bool = False) -> Path:
    """Write a tiny Kandinsky 5 image pipeline (diffusers layout) under ``root``; return its folder.

    Qwen2.5-VL + CLIP-L text encoders, a Flux-shaped VAE (with shift_factor 0.1159, which the
    K5 convention ignores) and a Kandinsky5Transformer3DModel whose zero-initialised modulation is
    randomised. ``i2i`` gives the transformer ``visual_cond`` (33 input channels).

    The real repos list ``tokenizer`` as a Qwen2VLProcessor, which transformers cannot build without
    torchvision. Without torchvision a bare Qwen2Tokenizer is saved, but model_index.json still
    names Qwen2VLProcessor, so loading the tiny model takes exactly the path a real one takes.
    """
    import json

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5I2IPipeline,
        Kandinsky5T2IPipeline,
        Kandinsky5Transformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    qwen_tok = make_qwen_tokenizer()
    clip_tok = make_clip_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": len(qwen_tok),
                "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
                "max_position_embeddings": 2048,
                "bos_token_id": None,
                "eos_token_id": qwen_tok.eos_token_id,
                "pad_token_id": qwen_tok.pad_token_id,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": 32,
                "fullatt_block_indexes": [1],
                "window_size": 56,
            },
            vocab_size=len(qwen_tok),
            image_token_id=qwen_tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=qwen_tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=qwen_tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=qwen_tok.convert_tokens_to_ids("<|vision_end|>"),
            pad_token_id=qwen_tok.pad_token_id,
            eos_token_id=qwen_tok.eos_token_id,
        )
    ).eval()
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    ).eval()
    transformer = Kandinsky5Transformer3DModel(**kandinsky5_transformer_config(visual_cond=i2i))
    randomize_zero_init(transformer, seed=seed)
    tokenizer = qwen_tok
    if _torchvision_works():
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tokenizer = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
            tokenizer=qwen_tok,
            video_processor=Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
        )
    pipeline_cls = Kandinsky5I2IPipeline if i2i else Kandinsky5T2IPipeline
    pipe = pipeline_cls(
        transformer=transformer,
        vae=make_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    out = Path(root) / ("tiny-kandinsky5-i2i" if i2i else "tiny-kandinsky5-t2i")
    pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "Qwen2VLProcessor"]  # what the published repos say
    index_path.write_text(json.dumps(index, indent=2))
    return out


def install_in_hf_cache(folder: Path, repo_id: str, cache_dir: Path, revision: str = "0" * 40) -> Path:
    """Lay ``folder`` out as a Hugging Face hub cache entry for ``repo_id``.

    With ``HF_HUB_CACHE=cache_dir`` and ``HF_HUB_OFFLINE=1``, ``from_pretrained(repo_id)`` then
    resolves the repo id exactly as it would after a real download. Lets tests cover the
    repo-id code path without a network.
    """
    import shutil

    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(folder, snap)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snap


def make_hunyuan_video_vae():
    """AutoencoderKLHunyuanVideo (16 latent channels, 8x spatial, 4x causal temporal), toy widths."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        scaling_factor=0.476986,
    ).eval()


def build_tiny_kandinsky5_video(root: str | Path, seed: int = 0, i2v: bool = False) -> Path:
    """Write a tiny Kandinsky 5 video pipeline (diffusers layout) under ``root``; return its folder.

    The text encoders, tokenizers and transformer are those of :func:`build_tiny_kandinsky5_image`
    with ``i2i=True``, so the transformer has ``visual_cond`` (33 input channels) as every published
    K5 video checkpoint has, T2V included; the VAE is a toy HunyuanVideo VAE. ``i2v`` only picks the
    pipeline class written to model_index.json (Kandinsky5I2VPipeline instead of Kandinsky5T2VPipeline).
    """
    import json
    import shutil

    from diffusers import Kandinsky5I2IPipeline, Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
    from transformers import Qwen2Tokenizer

    parts_root = Path(root) / "_tiny-k5-video-parts"
    parts = build_tiny_kandinsky5_image(parts_root, seed=seed, i2i=True)
    image = Kandinsky5I2IPipeline.from_pretrained(parts, tokenizer=None)
    torch.manual_seed(seed)
    pipeline_cls = Kandinsky5I2VPipeline if i2v else Kandinsky5T2VPipeline
    pipe = pipeline_cls(
        transformer=image.transformer,
        vae=make_hunyuan_video_vae(),
        text_encoder=image.text_encoder,
        tokenizer=Qwen2Tokenizer.from_pretrained(parts, subfolder="tokenizer"),
        text_encoder_2=image.text_encoder_2,
        tokenizer_2=image.tokenizer_2,
        # not the authors' 10.0, so tests see the family correct it (load_scheduler)
        scheduler=image.scheduler.__class__.from_config(image.scheduler.config, shift=5.0),
    )
    out = Path(root) / ("tiny-kandinsky5-i2v" if i2v else "tiny-kandinsky5-t2v")
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(parts_root)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "Qwen2VLProcessor"]  # what the published repos say
    index_path.write_text(json.dumps(index, indent=2))
    return out


# Kandinsky5Transformer3DModel of the published Kandinsky 5.0 *Video* Lite checkpoints (about 2 B
# parameters): Qwen2.5-VL-7B text (3584) and CLIP-L pooled (768) inputs. The video checkpoints set
# ``visual_cond=True`` (T2V included). The Image Lite transformer is larger (6 B):
# :data:`KANDINSKY5_IMAGE_LITE_TRANSFORMER` below.
KANDINSKY5_LITE_TRANSFORMER: dict = {
    "in_visual_dim": 16,
    "out_visual_dim": 16,
    "in_text_dim": 3584,
    "in_text_dim2": 768,
    "time_dim": 512,
    "patch_size": (1, 2, 2),
    "model_dim": 1792,
    "ff_dim": 7168,
    "num_text_blocks": 2,
    "num_visual_blocks": 32,
    "axes_dims": (16, 24, 24),
    "visual_cond": False,
    "attention_type": "regular",
}


def kandinsky5_transformer_config(
    *,
    model_dim: int = 48,
    ff_dim: int | None = None,
    num_visual_blocks: int = 2,
    num_text_blocks: int = 1,
    text_dim: int = 32,
    pooled_dim: int = 32,
    time_dim: int = 32,
    axes_dims: tuple[int, int, int] = (8, 8, 8),
    visual_cond: bool = False,
) -> dict:
    """Keyword arguments for ``Kandinsky5Transformer3DModel`` at a chosen width and depth.

    The defaults are the transformer of :func:`build_tiny_kandinsky5_image` (width 48, 2 visual
    blocks, 1 text block, ``ff_dim`` twice the width, head dim 24); ``text_dim`` / ``pooled_dim``
    must match the text encoders it is used with (32 for the tiny Qwen2.5-VL and CLIP), and the
    head dim is ``sum(axes_dims)``. :data:`KANDINSKY5_LITE_TRANSFORMER` is the published full size.
    """
    return {
        "in_visual_dim": 16,
        "out_visual_dim": 16,
        "in_text_dim": text_dim,
        "in_text_dim2": pooled_dim,
        "time_dim": time_dim,
        "patch_size": (1, 2, 2),
        "model_dim": model_dim,
        "ff_dim": 2 * model_dim if ff_dim is None else ff_dim,
        "num_text_blocks": num_text_blocks,
        "num_visual_blocks": num_visual_blocks,
        "axes_dims": tuple(axes_dims),
        "visual_cond": visual_cond,
        "attention_type": "regular",
    }


def build_kandinsky5_transformer(config: dict | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised ``Kandinsky5Transformer3DModel`` (zero-initialised modulation randomised).

    ``config`` is a dict of constructor arguments (default :func:`kandinsky5_transformer_config`
    with ``overrides`` as its keyword arguments); ``overrides`` update ``config`` when both are given.
    """
    from diffusers import Kandinsky5Transformer3DModel

    if config is None:
        config = kandinsky5_transformer_config(**overrides)
    else:
        config = {**config, **overrides}
    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(**config)
    randomize_zero_init(transformer, seed=seed)
    return transformer


# The published Kandinsky 5.0 *Image* Lite transformer (T2I, about 6 B parameters): the authors'
# ``get_default_t2i_conf`` / ``configs/config_t2i.yaml`` (kandinskylab/kandinsky-5) give 2560 wide,
# ff 10240, 2 text + 50 visual blocks and axes (32, 48, 48), i.e. 20 heads of 128; diffusers' docs
# list the T2I/I2I Lite checkpoints as 6 B. T2I has no ``visual_cond`` (I2I has it).
KANDINSKY5_IMAGE_LITE_TRANSFORMER: dict = {
    "in_visual_dim": 16,
    "out_visual_dim": 16,
    "in_text_dim": 3584,
    "in_text_dim2": 768,
    "time_dim": 512,
    "patch_size": (1, 2, 2),
    "model_dim": 2560,
    "ff_dim": 10240,
    "num_text_blocks": 2,
    "num_visual_blocks": 50,
    "axes_dims": (32, 48, 48),
    "visual_cond": False,
    "attention_type": "regular",
}

# The published Kandinsky 5.0 Video Lite transformer (T2V and I2V, about 2 B parameters; the authors'
# ``configs/k5_lite_t2v_*.yaml``): 1792 wide, 2 text + 32 visual blocks, and ``visual_cond`` (33 input
# channels), which every published K5 video checkpoint has, T2V included. Attention "regular": the
# 5 s checkpoints attend densely (the 10 s ones use NABLA at inference).
KANDINSKY5_VIDEO_LITE_TRANSFORMER: dict = {**KANDINSKY5_LITE_TRANSFORMER, "visual_cond": True}


def build_kandinsky5_transformer_like_pretrained(
    config: dict, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0
) -> torch.nn.Module:
    """A random ``Kandinsky5Transformer3DModel`` laid out as ``from_pretrained(torch_dtype=dtype)`` leaves a real one.

    Built directly in ``dtype`` on ``device`` (a 6 B model never exists in fp32 or on the host), the
    modules named in ``_keep_in_fp32_modules`` (time embeddings, modulation) are then put back in
    fp32, matched per dotted name component as diffusers' loader does, and the zero-initialised
    weights are randomised (:func:`randomize_zero_init`). For benchmarks of full-size models.
    """
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = Kandinsky5Transformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = list(transformer._keep_in_fp32_modules or [])
    for name, module in transformer.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    randomize_zero_init(transformer, seed=seed)
    return transformer


def build_tiny_dinov2(root: str | Path, seed: int = 0, hidden_size: int = 16) -> Path:
    """A tiny random ``transformers.Dinov2Model`` (patch 14) saved under ``root``: CREPA's teacher in tests."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        patch_size=14,
        image_size=28,
    )
    out = Path(root) / "tiny-dinov2"
    Dinov2Model(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``CLIPModel`` with its tokenizer and image processor, saved as a Hub CLIP repo is laid out.

    For ``evaluation_type: clip`` (``pretrained_evaluation_model_name_or_path``): config.json + weights,
    the tokenizer files and preprocessor_config.json in one folder, loaded back by the same code as
    openai/clip-vit-large-patch14.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tok = make_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
