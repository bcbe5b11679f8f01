"""torchao quantises exactly the layers quanto does: every linear the family's exclude list leaves.

quanto's set is pinned against the exclude patterns in ``test_memory.py``
(``test_excluded_layers_stay_unquantised``). torchao's filter also hands the previous layer's freed
memory back to the OS before each layer it picks (``_quantize_torchao``), so this pins that the
filter still picks the same layers, and that the result reports what the model holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_core.families import get_family_class
from trainer_core.memory.quantize import is_quantized_tensor, quantize_model


def _torchao_works() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    pytest.mark.skipif(not _torchao_works(), reason="torchao is not installed (optional; pip install torchao)"),
]


@pytest.fixture(scope="module")
def tiny_k5(tmp_path_factory) -> Path:
    from trainer_core.testing.tiny import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))


def load_transformer(family_name: str, path: Path) -> torch.nn.Module:
    """The family's transformer as ``from_pretrained`` gives it (weights mapped from the file)."""
    import diffusers

    cls_name = "Lumina2Transformer2DModel" if family_name == "lumina2" else "Kandinsky5Transformer3DModel"
    return getattr(diffusers, cls_name).from_pretrained(path, subfolder="transformer")


def holding_quantized_weights(model: torch.nn.Module) -> list[str]:
    """Linear layers whose weight is a quantised tensor, read off the model itself."""
    return sorted(
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_quantized_tensor(m.weight)
    )


@pytest.mark.parametrize("precision", ["int8-torchao", "fp8-torchao"])
@pytest.mark.parametrize("family_name", ["lumina2", "kandinsky5-image"])
def test_torchao_quantises_the_layers_quanto_quantises(tiny_lumina2, tiny_k5, family_name, precision):
    path = tiny_lumina2 if family_name == "lumina2" else tiny_k5
    exclude = get_family_class(family_name).quantization_exclude
    reference = quantize_model(load_transformer(family_name, path), "int8-quanto", exclude)

    transformer = load_transformer(family_name, path)
    result = quantize_model(transformer, precision, exclude)

    assert result.backend == "torchao" and result.quantized
    assert sorted(result.quantized) == sorted(reference.quantized)
    assert sorted(result.kept) == sorted(reference.kept)
    assert holding_quantized_weights(transformer) == sorted(result.quantized)
    assert not any(p.requires_grad for p in transformer.parameters())  # frozen, as quanto's


@pytest.mark.parametrize("precision", ["int8-torchao", "fp8-torchao", "int8-quanto"])
def test_a_lora_on_a_quantised_base_is_added_without_a_warning(tiny_lumina2, precision):
    """PEFT's TorchaoLoraLinear warns that merging would fail; we never merge, so no run shows it."""
    import warnings

    from trainer_core.lora.adapters import LUMINA2_TARGETS, add_lora, lora_config
    from trainer_core.spec import LoraSpec

    transformer = load_transformer("lumina2", tiny_lumina2)
    quantize_model(transformer, precision, get_family_class("lumina2").quantization_exclude)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = add_lora(transformer, lora_config(LoraSpec(lora_rank=4), LUMINA2_TARGETS["attention+ffn"]))
    assert params
    assert [f"{w.filename}: {w.message}" for w in caught] == []
