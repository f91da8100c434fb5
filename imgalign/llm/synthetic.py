"""A synthetic LLM preference task whose truth is known, and a tiny causal LM + tokenizer built offline.

Task "sort": the prompt lists distinct digits, the preferred response is them in ascending order, the
rejected response is the same sorted list with two positions swapped (so it is never sorted):
    prompt   "sort 3 5 1 ->"
    chosen   "1 3 5"
    rejected "3 1 5"
A model has learned the preference when its log-ratio against the reference is larger for the sorted
list on held-out prompts. Chance is 0.5; a bigram-level rule ("the next digit is larger") already
separates every pair, so a tiny LM with LoRA learns it in a few hundred CPU steps.

The tokenizer is word-level (`tokenizers` WordLevel wrapped in `PreTrainedTokenizerFast`), built in code,
with <bos> added to prompts like Llama's tokenizer does. The model is a tiny `LlamaForCausalLM` from a
config. Both are saved with `save_pretrained`, so recipes load them by path through the real loading code:

    python -m imgalign.llm.synthetic --out outputs/llm_tiny      # writes model/, train.jsonl, heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = ["sort", "->"] + [str(d) for d in range(10)]
VOCAB = SPECIALS + WORDS


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast over VOCAB: whitespace split, <bos> prepended to each text when
    add_special_tokens=True, <eos>/<pad>/<unk> set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int = len(VOCAB), hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
               seed: int = 0):
    """A randomly initialised LlamaForCausalLM small enough for CPU tests (about 20k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=128, bos_token_id=VOCAB.index("<bos>"),
                      eos_token_id=VOCAB.index("<eos>"), pad_token_id=VOCAB.index("<pad>"),
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_tiny_lm(out_dir: str | Path, seed: int = 0, **model_kw) -> Path:
    """Write a tiny Llama and the word tokenizer to `out_dir` (AutoModelForCausalLM/AutoTokenizer load it)."""
    out = Path(out_dir)
    tiny_llama(seed=seed, **model_kw).save_pretrained(out, safe_serialization=True)
    word_tokenizer().save_pretrained(out)
    return out


def sort_task(n: int, seed: int = 0, min_len: int = 3, max_len: int = 5) -> list[dict[str, str]]:
    """n rows {"prompt", "chosen", "rejected"} of the sort task (distinct digits, length min_len..max_len)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = rng.sample(range(10), rng.randint(min_len, max_len))
        good = sorted(digits)
        bad = list(good)
        i, j = sorted(rng.sample(range(len(bad)), 2))
        bad[i], bad[j] = bad[j], bad[i]
        rows.append({"prompt": "sort " + " ".join(map(str, digits)) + " ->",
                     "chosen": " ".join(map(str, good)), "rejected": " ".join(map(str, bad))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_sort_assets(out_dir: str | Path, n_train: int = 512, n_heldout: int = 128, seed: int = 0) -> dict[str, str]:
    """model/ (tiny Llama + tokenizer), train.jsonl and heldout.jsonl (different seeds) under out_dir."""
    out = Path(out_dir)
    model = save_tiny_lm(out / "model", seed=seed)
    train = write_jsonl(sort_task(n_train, seed=seed), out / "train.jsonl")
    held = write_jsonl(sort_task(n_heldout, seed=seed + 10_000), out / "heldout.jsonl")
    return {"model": str(model), "train": str(train), "heldout": str(held)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write the tiny LM and the synthetic sort preference task")
    p.add_argument("--out", default="outputs/llm_tiny")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-heldout", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(build_sort_assets(a.out, a.n_train, a.n_heldout, a.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
