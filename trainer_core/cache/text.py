"""Text-embedding cache: each distinct prompt string is encoded once, ever.

The key hashes the family, the text encoder's and tokenizer's content identity, the maximum
length and the *formatted* prompt (system prompt / template included), so changing any of them
re-encodes exactly the affected prompts. The encoder is loaded only when something is missing:
a second run with an unchanged dataset does not load it at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..families.base import ModelFamily
from ..io_utils import stable_hash
from .store import TensorStore

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to cache. ``source`` names the file it came from, for warnings.

    ``image`` is an image the text encoder sees with the prompt (Kandinsky 5 i2i shows Qwen the
    reference image): a :class:`~trainer_core.data.discovery.Sample` whose file content, size and
    crop become part of the key.
    """

    text: str
    role: str = "caption"  # "caption" or "negative"
    source: str | None = None
    image: Any = None


def image_key_fields(image: Any) -> dict[str, Any] | None:
    """What identifies the pixels of a prompt image: file content, bucket, resize and crop."""
    if image is None:
        return None
    return {"file": image.identity, **image.cache_fields()}


@dataclass
class CacheReport:
    total: int = 0
    encoded: int = 0
    reused: int = 0
    rebuilt: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class TextEmbedCache:
    def __init__(self, root: Path, family: ModelFamily) -> None:
        self.store = TensorStore(root)
        self.family = family
        self.identity = family.text_cache_identity()

    def key(self, text: str, role: str = "caption", image: Any = None) -> str:
        fields: dict[str, Any] = {"identity": self.identity, "text": self.family.format_prompt(text, role)}
        if image is not None:  # text-only keys stay exactly what they were before prompt images existed
            fields["image"] = image_key_fields(image)
        return stable_hash(fields)

    def ensure(
        self,
        requests: Iterable[PromptRequest],
        load_encoders: Callable[[], Any],
        *,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> CacheReport:
        import time

        start = time.perf_counter()
        unique: dict[str, PromptRequest] = {}
        for r in requests:
            unique.setdefault(self.key(r.text, r.role, r.image), r)
        report = CacheReport(total=len(unique))
        missing = [(k, r) for k, r in unique.items() if self.store.get(k) is None]
        report.rebuilt = self.store.rebuilt
        report.reused = report.total - len(missing)
        if progress:
            progress("text", report.reused, report.total)
        if missing:
            encoders = load_encoders()
            for i in range(0, len(missing), batch_size):
                chunk = missing[i : i + batch_size]
                formatted = [self.family.format_prompt(r.text, r.role) for _, r in chunk]
                if any(r.image is not None for _, r in chunk):
                    from ..data.images import load_image

                    images = [load_image(r.image) if r.image is not None else None for _, r in chunk]
                    encoded = self.family.encode_text(encoders, formatted, images=images)
                else:
                    encoded = self.family.encode_text(encoders, formatted)
                for (key, req), enc in zip(chunk, encoded):
                    if enc.truncated:
                        where = f" ({req.source})" if req.source else ""
                        report.warnings.append(
                            f"caption{where} is longer than {self.identity.get('max_length')} tokens and was cut: "
                            f"{req.text[:80]!r}..."
                        )
                    meta = {"text": req.text[:200], "role": req.role}
                    if req.image is not None:
                        meta["image"] = str(req.image.path)
                    self.store.put(key, enc.tensors, meta)
                    report.encoded += 1
                if progress:
                    progress("text", report.reused + report.encoded, report.total)
            del encoders
        report.seconds = time.perf_counter() - start
        return report

    def load(self, text: str, role: str = "caption", image: Any = None) -> dict[str, torch.Tensor]:
        entry = self.store.get(self.key(text, role, image))
        if entry is None:
            with_image = f" with image {image.path}" if image is not None else ""
            raise KeyError(f"prompt not cached: {text[:80]!r}{with_image}")
        return entry
