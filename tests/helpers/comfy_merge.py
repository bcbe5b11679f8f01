"""ComfyUI's LoRA/LyCORIS merge rules, as a stand-in for the tests that run without ComfyUI.

Written from reading ComfyUI's source (0.8.0 and 0.33.0 agree): ``comfy/lora.py``'s ``load_lora``
(which keys each module consumes, in which order) and ``comfy/weight_adapter/{lora,loha,lokr,base}.py``
(``calculate_weight`` at strength 1, float32, and ``weight_decompose`` for ``dora_scale``). It is
deliberately independent of ``trainer_core``'s exporter so that it can disagree with it. The opt-in
``tests/test_comfyui_lora_keys.py`` checks the real thing.

Facts encoded here:

* per module ``x`` (``diffusion_model.<weight key without .weight>``): ``x.alpha`` (``.item()``) and
  ``x.dora_scale`` are read first; then each adapter tries its keys: LoRA (``lora_up/lora_down``
  with optional ``lora_mid``, or ``lora_B/lora_A``), LoHa (``hada_w1_a`` ... with optional
  ``hada_t1/t2``), LoKr (any of ``lokr_w1``, ``lokr_w2``, ``lokr_w1_a``, ``lokr_w2_a``; ``lokr_t2``);
  then ``w_norm``/``b_norm``, ``diff``/``diff_b`` (which replace any adapter patch on the weight);
* LoRA scale ``alpha / down.shape[0]``; LoHa ``alpha / hada_w1_b.shape[0]``; LoKr ``alpha / dim``
  with ``dim`` the rank of the last factorised side (w2 over w1), 1.0 when neither is factorised;
  no alpha key: scale 1.0;
* ``dora_scale``: output axis when its first dimension equals the weight's, normalised by the
  row norm of the ORIGINAL weight; otherwise the column norm of ``W + delta``; plus float32 eps;
* an adapter whose computation raises (e.g. ``torch.kron`` on the non-contiguous result of the
  ``lokr_t2`` einsum, on torch 2.14) is logged as ``ERROR`` by ComfyUI and the weight is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

P = "diffusion_model."
EPS = torch.finfo(torch.float32).eps


def _get(lora: Mapping[str, torch.Tensor], used: set[str], key: str) -> torch.Tensor | None:
    if key in lora:
        used.add(key)
        return lora[key].float()
    return None


def _lora_patch(x: str, lora, used) -> tuple[torch.Tensor, str] | None:
    """(delta before alpha, name of the rank-giving tensor)."""
    for up_key, down_key, mid_key in (
        (f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"),
        (f"{x}.lora_B.weight", f"{x}.lora_A.weight", None),
    ):
        if up_key in lora:
            up, down = _get(lora, used, up_key), _get(lora, used, down_key)
            rank = down.shape[0]
            mid = _get(lora, used, mid_key) if mid_key else None
            if mid is not None:
                shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = down.reshape(shape).transpose(0, 1)
            return torch.mm(up.flatten(1), down.flatten(1)), rank
    return None


def _loha_patch(x: str, lora, used):
    if f"{x}.hada_w1_a" not in lora:
        return None
    w1a, w1b = _get(lora, used, f"{x}.hada_w1_a"), _get(lora, used, f"{x}.hada_w1_b")
    w2a, w2b = _get(lora, used, f"{x}.hada_w2_a"), _get(lora, used, f"{x}.hada_w2_b")
    t1 = _get(lora, used, f"{x}.hada_t1")
    if t1 is not None:
        t2 = _get(lora, used, f"{x}.hada_t2")
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return m1 * m2, w1b.shape[0]


def _lokr_patch(x: str, lora, used):
    names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    t = {n: _get(lora, used, f"{x}.{n}") for n in names}
    if all(t[n] is None for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        return None
    dim = None
    w1 = t["lokr_w1"]
    if w1 is None:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"]
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        if t["lokr_t2"] is None:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return lambda: (torch.kron(w1, w2), dim)  # computed inside ComfyUI's try block


def _decompose(w: torch.Tensor, delta: torch.Tensor, dora: torch.Tensor) -> torch.Tensor:
    calc = w + delta
    if dora.shape[0] == calc.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (
            calc.transpose(0, 1)
            .reshape(calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(calc.shape[1], *[1] * (calc.dim() - 1))
            .transpose(0, 1)
        )
    return calc * (dora / (norm + EPS))


def comfy_merge(
    base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """Apply ``lora`` (a ComfyUI file's tensors) to ``base`` (ComfyUI state-dict names, no prefix) at strength 1.

    Returns (merged float32 weights, the base keys that were patched, the file keys ComfyUI would
    not load plus ``'<module>: ERROR <message>'`` for each module whose patch ComfyUI fails to compute
    and skips). Only modules whose ``.weight`` is in ``base`` are looked up, as ComfyUI's key map does.
    """
    merged = {k: v.detach().float().clone() for k, v in base.items()}
    errors: set[str] = set()
    used: set[str] = set()
    patched: set[str] = set()
    for wkey in base:
        if not wkey.endswith(".weight"):
            continue
        stem = wkey[: -len(".weight")]
        x = P + stem
        alpha_t = _get(lora, used, f"{x}.alpha")
        alpha = alpha_t.item() if alpha_t is not None else None
        dora = _get(lora, used, f"{x}.dora_scale")
        w = merged[wkey]
        new_w = None
        for adapter in (_lora_patch, _loha_patch, _lokr_patch):
            got = adapter(x, lora, used)
            if got is None:
                continue
            try:
                delta, dim = got() if callable(got) else got
                if adapter is _lokr_patch:
                    scale = alpha / dim if alpha is not None and dim is not None else 1.0
                else:
                    scale = alpha / dim if alpha is not None else 1.0
                delta = delta.reshape(w.shape) * scale
                new_w = _decompose(w, delta, dora) if dora is not None else w + delta
            except RuntimeError as e:  # ComfyUI: logging.error("ERROR {name} {key} {e}"), weight unchanged
                errors.add(f"{x}: ERROR {e}")
        for wk, bk in (("w_norm", "b_norm"), ("diff", "diff_b")):
            wd = _get(lora, used, f"{x}.{wk}")
            if wd is not None:
                new_w = w + wd.reshape(w.shape)
            bd = _get(lora, used, f"{x}.{bk}")
            if bd is not None:
                bias_key = stem + ".bias"
                assert bias_key in merged, f"{bk} for {stem}, which has no bias"
                merged[bias_key] = merged[bias_key] + bd
                patched.add(bias_key)
        if new_w is not None:
            merged[wkey] = new_w
            patched.add(wkey)
    return merged, patched, (set(lora) - used) | errors
