"""LyCORIS networks on tiny transformers for the export tests, and the weights they really apply."""

from __future__ import annotations

import torch
from lycoris import LycorisNetwork, create_lycoris


def fuse_lumina2_qkv(t: torch.nn.Module) -> torch.nn.Module:
    """Replace each attention's to_q/to_k/to_v by one Linear ``to_qkv`` with rows [q | k | v].

    TODO: switch to trainer_core.families.lumina2_qkv once the fused-qkv branch is on main; only
    the weights matter here (the fused model's forward is never run).
    """
    for module in list(t.modules()):
        if all(hasattr(module, p) for p in ("to_q", "to_k", "to_v")):
            parts = [getattr(module, p) for p in ("to_q", "to_k", "to_v")]
            fused = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([p.weight for p in parts]))
            for p in ("to_q", "to_k", "to_v"):
                delattr(module, p)
            module.to_qkv = fused
    return t


# Factor std per algorithm, so that the weight deltas are a few hundredths (the tiny models' weights
# are ~0.15): a LoCon delta grows as std^2, LoHa and a factorised LoKr as std^4, full is the delta.
FACTOR_STD = {"locon": 0.12, "loha": 0.4, "lokr": 0.3, "full": 0.02}


def with_lycoris(t: torch.nn.Module, settings: dict, seed: int = 0):
    """``t`` with a LyCORIS network on every Linear, every tensor random and non-zero; returns the network.

    LyCORIS starts one factor at zero (a no-op adapter), which would hide a wrong scale or a
    swapped factor; DoRA magnitudes are moved off the weight norms they start at.
    """
    std = FACTOR_STD[settings["algo"]]
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "target_name": [], "module_algo_map": {}})
    settings = dict(settings)
    net = create_lycoris(t, 1.0, settings.pop("linear_dim"), settings.pop("linear_alpha"), **settings)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    net.eval()
    return net


def effective_weights(net) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """LyCORIS module name -> (weight, bias) that its forward applies, read off with identity inputs.

    This is what was trained. LyCORIS 4.1.3's ``get_merged_weight`` applies the LoKr/LoHa scale
    twice (``get_weight`` already includes it), so it is compared only where that scale is 1.
    """
    out = {}
    with torch.no_grad():
        for lora in net.loras:
            org = lora.org_module[0]
            n = org.in_features
            b = lora(torch.zeros(1, n))[0]
            w = (lora(torch.eye(n)) - b).T
            has_bias = getattr(org, "bias", None) is not None or getattr(lora, "bias", None) is not None
            out[lora.lora_name] = (w, b if has_bias else None)
            if getattr(lora, "scale", 1.0) == 1.0 and type(lora).__name__ != "FullModule":
                merged = lora.get_merged_weight()[0]
                assert torch.allclose(merged, w, atol=1e-5), f"{lora.lora_name}: get_merged_weight disagrees at scale 1"
    return out
