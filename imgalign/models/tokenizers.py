"""The real CLIP tokenizer, built offline from the BPE vocabulary that open-clip-torch ships.

transformers' `CLIPTokenizer` wants `vocab.json` + `merges.txt`; open_clip ships the same merges as
`bpe_simple_vocab_16e6.txt.gz`. The vocabulary is derived from the merges exactly as CLIP does it
(256 byte symbols, the same with `</w>`, one token per merge, then the two special tokens), so the
ids match `openai/clip-vit-large-patch14`'s tokenizer: 49408 tokens, `<|startoftext|>` = 49406,
`<|endoftext|>` = 49407.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[str, ...]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return tuple(lines[1 : CLIP_VOCAB_SIZE - 256 - 256 - 2 + 1])  # first line is a version header


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` of the real CLIP BPE tokenizer into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def clip_tokenizer(work_dir: str | Path, model_max_length: int = 77):
    """A transformers `CLIPTokenizer` with the real CLIP vocabulary, built without network."""
    from transformers import CLIPTokenizer

    # from_pretrained on a folder holding vocab.json + merges.txt works across transformers 4.x and 5.x
    d = write_clip_tokenizer_files(work_dir)
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=model_max_length, pad_token="<|endoftext|>")
