"""Stand-in for ``comfy.utils``: the progress bar and its global hook, and torch file loading.

As in ComfyUI, ``ProgressBar`` captures the hook when it is created and calls it on every update;
the hook installed by the harness (like ``main.py``'s) checks for Cancel first, so every progress
update is a cancel point.
"""

from __future__ import annotations

from typing import Any

PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function: Any) -> None:
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def load_torch_file(ckpt: str, safe_load: bool = False, device: Any = None, return_metadata: bool = False) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(ckpt)
    if return_metadata:
        with safe_open(ckpt, framework="pt") as f:
            return sd, f.metadata()
    return sd
