"""make_trainable: LoRA has no reference copy; full fine-tuning holds a frozen copy unless the recipe needs none."""

import torch

from imgalign.recipes.common import LoraConfig, ModelConfig, load_model, make_trainable


def test_full_finetuning_reference_copy_only_when_asked(tiny_pipelines):
    cfg = ModelConfig(pretrained=tiny_pipelines("sd15"))
    adapter = load_model(cfg, "cpu", torch.float32)
    reference = make_trainable(adapter, LoraConfig(enabled=False), False, torch.float32)
    assert reference is not adapter.denoiser and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in adapter.denoiser.parameters())

    adapter = load_model(cfg, "cpu", torch.float32)
    assert make_trainable(adapter, LoraConfig(enabled=False), False, torch.float32, reference=False) is None
    assert all(p.requires_grad for p in adapter.denoiser.parameters())

    adapter = load_model(cfg, "cpu", torch.float32)
    assert make_trainable(adapter, LoraConfig(enabled=True, rank=2), False, torch.float32) is None
    trainable = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
