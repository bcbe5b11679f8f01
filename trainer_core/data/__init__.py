"""Training data: discovery and checks, aspect buckets and crops, pixels (images and video clips), and batch order."""

from __future__ import annotations

from .buckets import bucket_label, plan_crop
from .discovery import discover
from .images import load_pixels
from .sampler import BucketBatchSampler
from .types import CropPlan, DatasetIndex, FramePlan, Sample
from .video import first_frame, largest_4k_plus_1

__all__ = [
    "BucketBatchSampler",
    "CropPlan",
    "DatasetIndex",
    "FramePlan",
    "Sample",
    "bucket_label",
    "discover",
    "first_frame",
    "largest_4k_plus_1",
    "load_pixels",
    "plan_crop",
]
