"""Data: preference pairs in the Pick-a-Pic layout, their joint transform, prompt sets, and image reading."""

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

__all__ = [
    "DataError",
    "ImageStats",
    "PairStats",
    "PairTransform",
    "PreferencePairs",
    "PromptRecord",
    "PromptStats",
    "collate_pairs",
    "load_preference_pairs",
    "load_prompt_file",
    "load_prompt_records",
    "pair_generator",
    "read_image",
    "to_rgb",
    "write_preference_jsonl",
    "write_preference_parquet",
]
