"""A node's error as ComfyUI reports it: under the node's display name, not the pack's module path.

ComfyUI sends ``exception_type`` = the class's ``__module__ + "." + __qualname__`` (bare
``__qualname__`` for ``builtins``), and a custom pack's module is named after its folder's full path.
Each node re-raises what escapes ``execute`` as a subclass of the original class named after the
node's display name: readable, still caught by ``except ConfigError`` and by ComfyUI's own
out-of-memory check, with the original traceback; Cancel passes untouched.
"""

from __future__ import annotations

import traceback
from importlib import import_module

import pytest
from comfy_stub import harness
from test_nodes_train import comfyui_exception_type


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    harness.install(tmp_path_factory.mktemp("comfy"))
    _, nodes = harness.load_pack()
    yield nodes
    harness.uninstall()


@pytest.fixture
def nodes(pack, tmp_path):
    harness.install(tmp_path / "comfy")
    return pack


def train_lora(nodes, **inputs):
    cls = nodes["TunerTrainLoRA"]
    return harness.run_node(cls, unique_id="7", **{**harness.schema_defaults(cls), **inputs})


def pack_module(name: str):
    return import_module(f"{harness.module_name()}.{name}")


def test_a_user_error_reads_as_the_node_with_its_message_unchanged(nodes):
    errors = pack_module("trainer_core.errors")
    with pytest.raises(errors.ConfigError) as failure:
        train_lora(nodes)  # no model connected
    assert comfyui_exception_type(type(failure.value)) == "Train LoRA"
    assert str(failure.value).startswith("Train LoRA needs a model\nHow to fix: connect a model loader")
    assert failure.value.hint and "Load Lumina2" in failure.value.hint  # the original's attributes
    # the traceback ComfyUI sends (format_tb) still reaches the line that raised it
    assert any("merged_spec" in line for line in traceback.format_tb(failure.value.__traceback__))
    # the log line ComfyUI prints last
    assert traceback.format_exception_only(failure.value)[-1].startswith("Train LoRA: Train LoRA needs a model")


def test_a_bug_keeps_its_class_name_in_the_message(nodes, monkeypatch):
    train_nodes = pack_module("nodes.train_nodes")

    def broken(**_):
        raise KeyError("learning_rate")

    monkeypatch.setattr(train_nodes, "assemble_spec", broken)
    with pytest.raises(KeyError) as failure:
        train_lora(nodes)
    assert comfyui_exception_type(type(failure.value)) == "Train LoRA"
    assert str(failure.value) == "KeyError: 'learning_rate'"


def test_out_of_memory_is_still_seen_as_out_of_memory_by_comfyui(nodes, monkeypatch):
    import torch

    train_nodes = pack_module("nodes.train_nodes")

    def out_of_memory(**_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_nodes, "assemble_spec", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as failure:  # ComfyUI's is_oom: isinstance, then its tips
        train_lora(nodes)
    assert comfyui_exception_type(type(failure.value)) == "Train LoRA"


def test_cancel_passes_through_untouched(nodes, monkeypatch):
    import comfy.model_management as mm

    train_nodes = pack_module("nodes.train_nodes")

    def cancelled(**_):
        raise mm.InterruptProcessingException()

    monkeypatch.setattr(train_nodes, "assemble_spec", cancelled)
    with pytest.raises(mm.InterruptProcessingException) as failure:
        train_lora(nodes)
    assert type(failure.value) is mm.InterruptProcessingException  # ComfyUI reports it as interrupted


def test_every_node_reports_its_own_display_name(nodes):
    for node_id, cls in nodes.items():
        schema = cls.GET_SCHEMA()
        with pytest.raises(Exception) as failure:
            harness.run_node(cls, unique_id="1", **{"not_an_input": 1})  # a TypeError in every execute
        assert comfyui_exception_type(type(failure.value)) == schema.display_name, node_id
        assert "TypeError: " in str(failure.value)
