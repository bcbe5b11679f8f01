"""The V3 extension ComfyUI loads: the explicit list of our nodes.

A node whose engine feature is not built yet is not listed (issue 6). Each node's errors are
reported under its display name (``node_errors``).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (
    adapter_nodes,
    cache_nodes,
    config_nodes,
    dataset_nodes,
    finetune_nodes,
    lora_nodes,
    memory_nodes,
    model_nodes,
    publish_nodes,
    regulariser_nodes,
    routing_nodes,
    settings_nodes,
    tracking_nodes,
    train_nodes,
)
from .node_errors import readable_errors


def node_classes() -> list[type[io.ComfyNode]]:
    nodes = [
        *model_nodes.NODES,
        *dataset_nodes.NODES,
        *settings_nodes.NODES,
        *memory_nodes.NODES,
        *adapter_nodes.NODES,
        *routing_nodes.NODES,
        *regulariser_nodes.NODES,
        *tracking_nodes.NODES,
        *publish_nodes.NODES,
        *config_nodes.NODES,
        *cache_nodes.NODES,
        *train_nodes.NODES,
        *finetune_nodes.NODES,
        *lora_nodes.NODES,
    ]
    return [readable_errors(cls) for cls in nodes]


class TunerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
