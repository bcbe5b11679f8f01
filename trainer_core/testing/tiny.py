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
