"""Training data: discovery and checks, aspect buckets and crops, pixels, and batch order."""

from __future__ import annotations

from .buckets import CropPlan, plan_crop
from .discovery import DatasetIndex, Sample, discover
from .images import load_pixels
from .sampler import BucketBatchSampler

__all__ = ["BucketBatchSampler", "CropPlan", "DatasetIndex", "Sample", "discover", "load_pixels", "plan_crop"]
