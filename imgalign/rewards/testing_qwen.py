"""A tiny random Qwen-VL judge built offline, saved the way a released checkpoint is laid out (tests, benchmarks).

The UniGenBench evaluation models (``CodeGoat24/UniGenBench-EvalModel-qwen-72b-v1``, ``-qwen3vl-32b-v1``) and the
UnifiedReward judges are Qwen2.5-VL / Qwen3-VL fine-tunes. :func:`save_tiny_qwen_vl` writes a model of the same
class (one text layer, one vision block, width 32) with random weights, its processor (the class-default
``Qwen2VLImageProcessor``: 14-pixel patches for Qwen2.5-VL, 16 for Qwen3-VL, merged 2x2 into one image token; a
small image is scaled up to at least 56x56 pixels), a
byte-level BPE tokenizer trained here on the judge instructions (any text encodes; the Qwen special tokens
``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ... are single
tokens) and a Qwen-style chat template, so ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it by path
exactly as they load the real judge. Random weights answer garbage; tests check the plumbing, or force the answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

#: Qwen2-VL's chat template, reduced to what a judge sends (text and image entries; a default system turn).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def tiny_qwen_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on the UniGenBench judge instructions and a
    judge answer, with the Qwen special tokens; eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from imgalign.eval.unigenbench_data import JUDGE_TEMPLATE_EN, JUDGE_TEMPLATE_ZH

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    answer = "<description><analysis>['a red circle', 'no']</analysis><score>[1, 0]</score></description>"
    tokenizer.train_from_iterator([JUDGE_TEMPLATE_EN, JUDGE_TEMPLATE_ZH, answer], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=32768)


def save_tiny_qwen_vl(directory: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (``family="qwen2_5_vl"``) or Qwen3-VL (``"qwen3_vl"``) with its processor."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tokenizer = tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                # multimodal rotary embedding: (temporal, height, width) sections of head_dim / 2 = 8
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "fullatt_block_indexes": [0],
                                                                   "window_size": 56}, **special)
        model_class = Qwen2_5_VLForConditionalGeneration
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        config = Qwen3VLConfig(text_config=text, vision_config={**vision, "deepstack_visual_indexes": [0],
                                                                "num_position_embeddings": 64}, **special)
        model_class = Qwen3VLForConditionalGeneration
        processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16), tokenizer=tokenizer,
                                     video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return Path(directory)
