"""Turns sampler batches into model-ready tensors from the on-disk caches.

Entries are kept in memory after their first read (bounded), so after the first epoch a small
dataset costs no disk reads at all. Latents come from a :class:`LatentCache` or, with
``vae_cache_ondemand``/``vae_cache_disable``, from :class:`OnTheFlyLatents`; both answer
``key``/``load_many``, and a batch's misses are fetched in one call so on-the-fly encodes share a
VAE batch. ``latent_memory_entries=0`` keeps no latent in memory (``vae_cache_disable``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cache.latents import LatentCache
from ..cache.on_the_fly import OnTheFlyLatents
from ..cache.text import TextEmbedCache
from ..data.types import Sample
from ..families.base import ModelFamily


@dataclass
class Batch:
    x0: torch.Tensor
    text: dict[str, torch.Tensor]
    captions: list[str]
    condition: torch.Tensor | None = None  # reference latents (image editing), drawn like x0; same shape
    samples: list[Sample] | None = None  # what the batch was drawn from (CREPA's teacher features)


class _Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def peek(self, key: str) -> dict[str, torch.Tensor] | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        if self.capacity <= 0:
            return
        self.items[key] = value
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, key: str, load) -> dict[str, torch.Tensor]:
        value = self.peek(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value


class CachedBatches:
    def __init__(
        self,
        samples: list[Sample],
        family: ModelFamily,
        text_cache: TextEmbedCache,
        latent_cache: LatentCache | OnTheFlyLatents,
        caption_dropout: float,
        memory_entries: int = 4096,
        latent_memory_entries: int | None = None,
    ) -> None:
        self.samples = samples
        self.family = family
        self.text_cache = text_cache
        self.latent_cache = latent_cache
        self.caption_dropout = caption_dropout
        self._latents = _Lru(memory_entries if latent_memory_entries is None else latent_memory_entries)
        self._texts = _Lru(memory_entries)

    def pick_caption(self, sample: Sample, generator: torch.Generator) -> str:
        """One of the sample's captions, or "" with probability caption_dropout (unconditional)."""
        if self.caption_dropout > 0 and torch.rand((), generator=generator).item() < self.caption_dropout:
            return ""
        if len(sample.captions) == 1:
            return sample.captions[0]
        return sample.captions[int(torch.randint(len(sample.captions), (), generator=generator))]

    def text(self, caption: str, role: str = "caption", image: Sample | None = None) -> dict[str, torch.Tensor]:
        key = self.text_cache.key(caption, role, image)
        return self._texts.get(key, lambda: self.text_cache.load(caption, role, image))

    def latents(self, samples: list[Sample]) -> list[dict[str, torch.Tensor]]:
        """The latent entries of ``samples``, in order: from memory, else from the source in one call."""
        keys = [self.latent_cache.key(s) for s in samples]
        entries = [self._latents.peek(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            for i, entry in zip(missing, self.latent_cache.load_many([samples[i] for i in missing])):
                entries[i] = entry
                self._latents.put(keys[i], entry)
        return entries  # type: ignore[return-value]  # every None was filled above

    def build(self, indices: list[int], generator: torch.Generator) -> Batch:
        samples = [self.samples[i] for i in indices]
        captions = [self.pick_caption(s, generator) for s in samples]
        x0 = self.family.sample_latents(self.latents(samples), generator)
        condition = None
        references = [s.reference for s in samples]
        if any(r is not None for r in references):
            if any(r is None for r in references):
                raise ValueError("a batch mixes samples with and without reference images")
            # a fresh posterior draw each step, as diffusers' i2i pipeline samples its reference latent
            condition = self.family.sample_latents(self.latents(references), generator)
        text = self.family.collate_text([self.text(c, image=s.reference) for c, s in zip(captions, samples)])
        return Batch(x0=x0, text=text, captions=captions, condition=condition, samples=samples)
