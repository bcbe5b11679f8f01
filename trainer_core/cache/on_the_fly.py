"""Latents encoded while training instead of in a pre-pass (``vae_cache_ondemand``, ``vae_cache_disable``).

Why both exist (they are SimpleTuner's keys):

* ``vae_cache_ondemand``: training starts without a pass over the whole dataset. A file is
  encoded the first time a batch draws it and written to the latent cache, so later epochs and
  later runs read it like any cached entry. Worth it when the dataset is large and the run short.
* ``vae_cache_disable``: nothing is written to disk, and every draw encodes again (no copy is kept
  in memory either, so a dataset larger than RAM works). Worth it when disk space is what is short.

Either way the VAE stays loaded for the whole run (its memory is reported in the ``memory`` event)
and each step pays for the encodes. The entries are those the latent cache would hold: the same
``encode_pixels`` call on the same pixels, keyed by the same :meth:`LatentCache.key`, so a run
trains on the same posteriors whichever way its latents were made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ..data.images import load_pixels
from ..data.types import Sample
from .latents import LatentCache


class OnTheFlyLatents:
    """Encodes the samples a batch needs; with ``write`` (on-demand) reads and fills ``cache`` too."""

    def __init__(
        self,
        cache: LatentCache,
        load_vae: Callable[[], torch.nn.Module],
        *,
        write: bool,
        batch_size: int = 4,
        vae: torch.nn.Module | None = None,
    ) -> None:
        """``vae``: one already loaded (the engine loads it before the transformer); else loaded at the first miss."""
        self.cache = cache
        self.family = cache.family
        self.write = write
        self.batch_size = batch_size
        self._load_vae = load_vae
        self.vae = vae
        self.encoded = 0  # encodes done while training (a test and the report read them)
        self.reused = 0  # on-demand entries found in the cache

    @property
    def identity(self) -> dict:
        return self.cache.identity

    def key(self, sample: Sample) -> str:
        return self.cache.key(sample)

    def missing(self, samples: Sequence[Sample]) -> int:
        """How many distinct samples have no cache entry yet (a file check, nothing is read)."""
        keys = {(s.dataset_id, self.key(s)) for s in samples}
        return sum(not self.cache.stores[ds].has(k) for ds, k in keys)

    def load(self, sample: Sample) -> dict[str, torch.Tensor]:
        return self.load_many([sample])[0]

    def load_many(self, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
        """One entry per sample, in order; the misses are encoded in VAE batches of one bucket each."""
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(samples)
        if self.write:
            for i, s in enumerate(samples):
                entries[i] = self.cache.stores[s.dataset_id].get(self.key(s))
            self.reused += sum(e is not None for e in entries)
        by_bucket: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, entry in enumerate(entries):
            if entry is None:
                by_bucket[samples[i].bucket_key].append(i)
        for indices in by_bucket.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, entry in zip(chunk, self._encode([samples[i] for i in chunk])):
                    entries[i] = entry
        return entries  # type: ignore[return-value]  # every None was filled above

    def _encode(self, samples: list[Sample]) -> list[dict[str, torch.Tensor]]:
        if self.vae is None:
            self.vae = self._load_vae()
        pixels = torch.stack([load_pixels(s) for s in samples])
        with torch.no_grad():
            out = self.family.encode_pixels(self.vae, pixels)
        self.encoded += len(out)
        if self.write:
            for s, entry in zip(samples, out):
                self.cache.stores[s.dataset_id].put(self.key(s), entry, {"file": str(s.path)})
        return out
