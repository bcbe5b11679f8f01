"""Stand-ins for model parts that record how the trainer calls them."""

from __future__ import annotations

import torch


class TransformerRecorder(torch.nn.Module):
    """Stands in for a Kandinsky 5 transformer and records what it is called with.

    Returns the first 16 input channels (the noisy latent) as the prediction, so shapes flow through.
    """

    dtype = torch.float32

    def __init__(self, visual_cond: bool = False) -> None:
        super().__init__()
        self.config = type("Config", (), {"visual_cond": visual_cond, "patch_size": (1, 2, 2)})()
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["hidden_states"][..., :16]
