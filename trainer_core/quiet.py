"""Keep third-party chatter out of a run's output, so that the lines this project prints are read.

Why filters rather than import order: transformers (5.x) imports torchao from ``modeling_utils``
whenever torchao is installed (its quantizer registry does, and peft imports transformers), and
diffusers imports it again when it loads a model. Every run that loads a text encoder therefore
imports torchao, whether or not the run quantises with it, and torchao reports what it lacks as it
imports: C++ extensions built for another torch, no triton on a machine without a GPU, Enum
registrations that newer torch deprecates. None of that is about the run, and our own code already
imports torchao and optimum-quanto only inside the functions that quantise (``memory/quantize.py``).

So each known line is dropped at its source, by exact logger (or warning category) and message
fragment, and only in the processes that train (the CLI calls :func:`quiet_third_party`). Anything
else those libraries say, a real error included, still shows. Each entry names why it is noise.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownNoise:
    """One third-party log line that says nothing about the run."""

    logger: str  # the exact logger that emits it (a filter on a logger sees only its own records)
    fragment: str  # a piece of the message that only this line has
    why: str


KNOWN_LOG_NOISE: tuple[KnownNoise, ...] = (
    KnownNoise(
        "torchao",
        "Failed to load ",
        "torchao's optional C++/CUDA kernels (mxfp8, cutlass) do not match the installed torch; its Python"
        " quantisation, the part we use, works without them",
    ),
    KnownNoise(
        "torchao.kernel.intmm",
        "Detected no triton",
        "torchao imports its triton int-matmul kernels at import; without a GPU there is no triton, and we never"
        " call those kernels",
    ),
    KnownNoise(
        "torch.utils._pytree",
        "is an Enum subclass and is now natively supported",
        "torchao registers its Enums with torch.compile the pre-2.13 way; a deprecation for torchao's authors",
    ),
    KnownNoise(
        "diffusers.quantizers.torchao.torchao_quantizer",
        "Unable to import `torchao` Tensor objects",
        "diffusers prepares to unpickle torchao-quantised checkpoints; we load no such checkpoint",
    ),
)

# (category, message regex at the start of the warning text, why)
KNOWN_WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        r"The `local_dir_use_symlinks` argument is deprecated",
        "diffusers' config loader passes this retired argument to huggingface_hub on every repo-id load",
    ),
)


class _DropKnown(logging.Filter):
    def __init__(self, fragments: list[str]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(f in text for f in self.fragments)


_installed = False


def quiet_third_party() -> None:
    """Drop the known third-party lines (idempotent); call before the heavy libraries import.

    Also turns off transformers' own "Loading weights" / "Writing model shards" bars (our progress
    line is the run's progress), but keeps huggingface_hub's download bars: a first run from a repo
    id downloads gigabytes, and that bar is worth seeing.
    """
    global _installed
    if _installed:
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for noise in KNOWN_LOG_NOISE:
        by_logger.setdefault(noise.logger, []).append(noise.fragment)
    for name, fragments in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnown(fragments))
    for category, message, _why in KNOWN_WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    _library_bars_off()


def _library_bars_off() -> None:
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    hub_bars_were_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # this switches the hub's bars off too ...
    if not hub_bars_were_off:
        enable_progress_bars()  # ... so give the download bars back
