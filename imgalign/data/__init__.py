"""Data: preference pairs in the Pick-a-Pic layout, their joint transform, unpaired (desirable / undesirable)
images, prompt sets, and image reading."""

from imgalign.data.errors import DataError
from imgalign.data.images import ImageStats, read_image, to_rgb
from imgalign.data.pair_transform import PairTransform, collate_pairs, pair_generator
from imgalign.data.preference import (
    PairStats,
    PreferencePairs,
    load_preference_pairs,
    write_preference_jsonl,
    write_preference_parquet,
)
from imgalign.data.prompts import PromptRecord, PromptStats, load_prompt_file, load_prompt_records
from imgalign.data.unpaired import (
    ImageTransform,
    UnpairedImages,
    UnpairedStats,
    collate_images,
    detect_layout,
    load_unpaired_images,
    split_pairs,
    write_unpaired_jsonl,
)

__all__ = [
    "DataError",
    "ImageStats",
    "ImageTransform",
    "PairStats",
    "PairTransform",
    "PreferencePairs",
    "PromptRecord",
    "PromptStats",
    "UnpairedImages",
    "UnpairedStats",
    "collate_images",
    "collate_pairs",
    "detect_layout",
    "load_preference_pairs",
    "load_prompt_file",
    "load_prompt_records",
    "load_unpaired_images",
    "pair_generator",
    "read_image",
    "split_pairs",
    "to_rgb",
    "write_preference_jsonl",
    "write_preference_parquet",
    "write_unpaired_jsonl",
]
