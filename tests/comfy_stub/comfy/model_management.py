"""Stand-in for ``comfy.model_management``: interruption flag, model unloading, the torch device.

The interruption functions behave as ComfyUI's do: ``throw_exception_if_processing_interrupted``
raises once and clears the flag; ``processing_interrupted`` only peeks.
"""

from __future__ import annotations

import threading
from typing import Any


class InterruptProcessingException(Exception):
    pass


_lock = threading.RLock()
_interrupt = False
calls: list[str] = []  # test hook: "unload_all_models", "soft_empty_cache" in call order


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt
    with _lock:
        _interrupt = value


def processing_interrupted() -> bool:
    with _lock:
        return _interrupt


def throw_exception_if_processing_interrupted() -> None:
    global _interrupt
    with _lock:
        if _interrupt:
            _interrupt = False
            raise InterruptProcessingException()


def unload_all_models() -> None:
    calls.append("unload_all_models")


def soft_empty_cache(force: bool = False) -> None:
    calls.append("soft_empty_cache")


def get_torch_device() -> Any:
    import torch

    return torch.device("cpu")


def reset() -> None:
    interrupt_current_processing(False)
    calls.clear()
