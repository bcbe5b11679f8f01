"""Latent cache: each (file content, crop plan, VAE) is encoded once.

The key hashes the file's content identity, its bucket, resize and crop box, and the VAE's
identity and scaling convention: editing an image, changing the resolution or crop, or swapping
the VAE re-encodes exactly the affected samples. Entries hold the scaled posterior mean and std
so training draws a fresh latent sample each step, as un-cached training would.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data.images import load_pixels
from ..data.types import Sample
from ..families.base import ModelFamily
from ..io_utils import stable_hash
from .store import TensorStore
from .text import CacheReport, Progress


class LatentCache:
    def __init__(self, roots: dict[str, Path], family: ModelFamily) -> None:
        """``roots`` maps dataset id -> its cache_dir_vae."""
        self.stores = {ds_id: TensorStore(root) for ds_id, root in roots.items()}
        self.family = family
        self.identity = family.latent_cache_identity()

    def key(self, sample: Sample) -> str:
        """Hash of the VAE identity, the file content and what selects its pixels (crop, frames)."""
        return stable_hash({"identity": self.identity, "file": sample.identity, **sample.cache_fields()})

    def ensure(
        self,
        samples: Sequence[Sample],
        load_vae: Callable[[], torch.nn.Module],
        *,
        batch_size: int = 4,
        progress: Progress | None = None,
    ) -> CacheReport:
        start = time.perf_counter()
        unique = {(s.dataset_id, self.key(s)): s for s in samples}
        report = CacheReport(total=len(unique))
        missing = [(ds, k, s) for (ds, k), s in unique.items() if self.stores[ds].get(k) is None]
        report.rebuilt = sum(st.rebuilt for st in self.stores.values())
        report.reused = report.total - len(missing)
        if progress:
            progress("latents", report.reused, report.total)
        if missing:
            vae = load_vae()
            by_bucket: dict[tuple[int, ...], list] = defaultdict(list)
            for item in missing:
                by_bucket[item[2].bucket_key].append(item)
            for items in by_bucket.values():
                for i in range(0, len(items), batch_size):
                    chunk = items[i : i + batch_size]
                    pixels = torch.stack([load_pixels(s) for _, _, s in chunk])
                    for (ds, key, s), entry in zip(chunk, self.family.encode_pixels(vae, pixels)):
                        self.stores[ds].put(key, entry, {"file": str(s.path)})
                        report.encoded += 1
                    if progress:
                        progress("latents", report.reused + report.encoded, report.total)
            del vae
        report.seconds = time.perf_counter() - start
        return report

    def load_many(self, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
        return [self.load(s) for s in samples]

    def load(self, sample: Sample) -> dict[str, torch.Tensor]:
        entry = self.stores[sample.dataset_id].get(self.key(sample))
        if entry is None:
            raise KeyError(f"latent not cached: {sample.path}")
        return entry
