"""LLM preference data: pairs (prompt, chosen, rejected), lists (prompt, responses, ranks or scores), or unpaired
completions (prompt, completion, label).

Sources, one entry point:
    data = load_llm_preferences("pairs.jsonl")                        # one JSON object per line
    data = load_llm_preferences("saved_dataset/")                     # datasets.save_to_disk folder
    data = load_llm_preferences("trl-lib/ultrafeedback_binarized")    # hub id (needs `datasets`)
    data = load_llm_preferences(dataset_or_list_of_dicts)             # in memory
Row formats:
    pairwise   {"prompt": str, "chosen": str, "rejected": str}
    listwise   {"prompt": str, "responses": [str, ...], "ranks": [1, 3, 2]}   (rank 1 = best)
               or {"prompt": ..., "responses": [...], "scores": [0.9, 0.1, 0.5]}  (higher = better)
    unpaired   {"prompt": str, "completion": str, "label": true}   (TRL's unpaired layout: label true = desirable,
               false = undesirable; 1 / 0 are accepted too). For KTO and BCO; pairs become unpaired items by
               `unpair_items` (chosen desirable, rejected undesirable)
    conversational: prompt / chosen / rejected / responses as lists of {"role", "content"} messages,
               rendered with the tokenizer's chat template; without a prompt column the shared leading
               messages of chosen and rejected are the prompt (TRL's implicit-prompt convention).
Bad rows raise DataError naming the source, the row and the fix.

Internally a pair is a list of two responses with rewards (1, 0), and an unpaired completion a list of one with
reward 1 (desirable) or 0, so one batch layout serves all three:
collate() stacks response j of every example together, giving [y_1 of all B, y_2 of all B, ...] —
for pairs exactly [chosen_1..chosen_B, rejected_1..rejected_B], the concatenated-forward layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgalign.data.errors import DataError, short

Messages = list  # [{"role": ..., "content": ...}, ...]


@dataclass
class LLMPreferences:
    """Validated rows; every row is {"prompt", "responses": [...], "rewards": [...]} (higher = better)."""

    source: str
    rows: list[dict[str, Any]]
    listwise: bool  # True when the source was listwise (responses + ranks/scores)
    n_read: int = 0
    unpaired: bool = False  # True when the source was unpaired (prompt, completion, label)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        return "lists" if self.listwise else "unpaired" if self.unpaired else "pairs"

    def summary(self) -> str:
        if self.unpaired:
            n_good = sum(1 for r in self.rows if r["rewards"][0] == 1.0)
            return (f"{self.source}: {len(self.rows)} unpaired completions ({n_good} desirable, "
                    f"{len(self.rows) - n_good} undesirable)")
        kind = f"lists of {len(self.rows[0]['responses'])}" if self.listwise and self.rows else "pairs"
        return f"{self.source}: {len(self.rows)} {kind}"


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x) and bool(x)


def _check_text(value: Any, key: str, where: str, conversational_ok: bool = True) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{key}' is empty; every prompt and response needs text")
        return value
    if conversational_ok and _is_messages(value):
        return value
    raise DataError(f"{where}: '{key}' must be a string or a list of {{role, content}} messages, "
                    f"got {short(value)} ({type(value).__name__})")


def _split_implicit_prompt(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, Messages, Messages]:
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0 or k == len(chosen) or k == len(rejected):
        raise DataError(f"{where}: no 'prompt' column and chosen/rejected share no leading prompt messages "
                        "followed by differing responses; add a 'prompt' column")
    return chosen[:k], chosen[k:], rejected[k:]


_LABEL_HELP = "label must be true (the completion is desirable) or false (undesirable); 1 and 0 are accepted too"


def _parse_row(row: Any, where: str) -> tuple[dict[str, Any], str]:
    """-> (row as {"prompt", "responses", "rewards"}, its kind: "pairs", "lists" or "unpaired")."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "completion" in row:  # unpaired (TRL's unpaired preference layout)
        missing = [k for k in ("prompt", "label") if row.get(k) is None]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}; unpaired rows need prompt/completion/label "
                            f"(found: {', '.join(sorted(row))})")
        prompt = _check_text(row["prompt"], "prompt", where)
        completion = _check_text(row["completion"], "completion", where)
        label = row["label"]
        if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
            return {"prompt": prompt, "responses": [completion], "rewards": [float(label)]}, "unpaired"
        raise DataError(f"{where}: 'label' = {short(label)} is invalid; {_LABEL_HELP}. Fix the label or drop the row")
    if "responses" in row:  # listwise
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: 'responses' must be a list of at least 2 responses, got {short(responses)}")
        if "prompt" not in row:
            raise DataError(f"{where}: listwise rows need a 'prompt' column (found: {', '.join(sorted(row))})")
        prompt = _check_text(row["prompt"], "prompt", where)
        responses = [_check_text(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
        if "ranks" in row and row["ranks"] is not None:
            values, key = row["ranks"], "ranks"
        elif "scores" in row and row["scores"] is not None:
            values, key = row["scores"], "scores"
        else:
            raise DataError(f"{where}: listwise rows need 'ranks' (1 = best) or 'scores' (higher = better)")
        if not isinstance(values, list) or len(values) != len(responses) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise DataError(f"{where}: '{key}' must be a list of {len(responses)} numbers, one per response, "
                            f"got {short(values)}")
        if len(set(values)) == 1:
            raise DataError(f"{where}: all {key} are equal, so the row holds no preference; drop it")
        rewards = [-float(v) for v in values] if key == "ranks" else [float(v) for v in values]
        return {"prompt": prompt, "responses": responses, "rewards": rewards}, "lists"

    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; pairwise rows need prompt/chosen/rejected, "
                        f"listwise rows prompt/responses/ranks, unpaired rows prompt/completion/label "
                        f"(found: {', '.join(sorted(row))})")
    chosen = _check_text(row["chosen"], "chosen", where)
    rejected = _check_text(row["rejected"], "rejected", where)
    if row.get("prompt") is None:
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise DataError(f"{where}: missing column 'prompt' (only conversational rows may leave it implicit)")
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
    else:
        prompt = _check_text(row["prompt"], "prompt", where)
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical ({short(chosen)}); drop the row")
    return {"prompt": prompt, "responses": [chosen, rejected], "rewards": [1.0, 0.0]}, "pairs"


def _iter_source(source: Any, split: str) -> tuple[str, Any, str]:
    """-> (name, iterable of rows, how rows are addressed in errors: 'line' or 'row')."""
    if isinstance(source, (list, tuple)):
        return "<in-memory rows>", source, "row"
    if not isinstance(source, (str, Path)):  # a datasets.Dataset / DatasetDict
        ds = source
        if isinstance(getattr(ds, "column_names", None), dict):  # a DatasetDict
            ds = ds[split]
        return "<in-memory dataset>", ds, "row"
    path = Path(source)
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use JSONL (one object per line)")
        return str(path), _jsonl_rows(path), "line"
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise DataError(f"{path}: reading a saved dataset folder needs `pip install datasets`") from e
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and split in ds:
            ds = ds[split]
        return str(path), ds, "row"
    if str(source).endswith((".jsonl", ".json")):
        raise DataError(f"preference file not found: {source}")
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise DataError(f"{source!r} is not a file or folder; loading it as a hub dataset needs "
                        "`pip install datasets`") from e
    return str(source), load_dataset(str(source), split=split), "row"


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                yield _BLANK
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg}); each line must be one "
                                "JSON object with prompt/chosen/rejected") from None


_BLANK = object()


def load_llm_preferences(source: Any, split: str = "train", max_rows: int | None = None,
                         columns: dict[str, str] | None = None) -> LLMPreferences:
    """Read and validate preference rows (see the module docstring for sources and formats).

    columns renames source columns to ours, e.g. {"question": "prompt", "response_j": "chosen"}.
    """
    name, rows, unit = _iter_source(source, split)
    columns = columns or {}
    out, kinds, n_read = [], set(), 0
    for i, row in enumerate(rows):
        if max_rows is not None and n_read >= max_rows:
            break
        where = f"{name}, {unit} {i + 1}" if unit == "line" else f"{name}, row {i}"
        if row is _BLANK:
            continue
        n_read += 1
        if columns and isinstance(row, dict):
            row = {columns.get(k, k): v for k, v in row.items()}
        parsed, kind = _parse_row(row, where)
        kinds.add(kind)
        if len(kinds) > 1:
            raise DataError(f"{where}: mixes {' and '.join(sorted(kinds))} rows; use one format per source")
        if kind == "lists" and out and len(parsed["responses"]) != len(out[0]["responses"]):
            raise DataError(f"{where}: {len(parsed['responses'])} responses, but earlier rows have "
                            f"{len(out[0]['responses'])}; listwise data needs the same list size in every row")
        out.append(parsed)
    if not out:
        raise DataError(f"{name}: no preference rows found")
    return LLMPreferences(name, out, listwise=kinds == {"lists"}, n_read=n_read, unpaired=kinds == {"unpaired"})


# ----------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class TokenStats:
    n_examples: int = 0
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        mx = max(self.lengths) if self.lengths else 0
        return (f"{self.n_examples} examples, longest sequence {mx} tokens, truncated: "
                f"{self.n_prompt_truncated} prompts, {self.n_response_truncated} responses")


def _render(tokenizer, prompt: Any, response: Any, append_eos: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one prompt/response, text or conversational."""
    if isinstance(prompt, str) and isinstance(response, str):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            r = r + [tokenizer.eos_token_id]
        return list(p), list(r)
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    resp_msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    p_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_msgs + resp_msgs, tokenize=False)
    if not full.startswith(p_text):
        raise DataError("the chat template does not render the prompt as a prefix of prompt + response; "
                        "pass plain-text prompts and responses instead")
    p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    return list(p), list(r)


def tokenize_preferences(data: LLMPreferences, tokenizer, max_length: int = 512, max_prompt_length: int = 256,
                         append_eos: bool = True) -> tuple[list[dict[str, Any]], TokenStats]:
    """Rows -> items {"prompt_ids", "response_ids": [[...], ...], "rewards"}.

    Truncation: the prompt keeps its last max_prompt_length tokens (the end is next to the response); each
    response keeps its first max_length - len(prompt) tokens. Plain-text responses get the EOS token appended
    (conversational ones end as the chat template ends them).
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) "
                         "so every response keeps at least one token")
    items, stats = [], TokenStats()
    for i, row in enumerate(data.rows):
        responses = []
        prompt_ids = None
        for resp in row["responses"]:
            try:
                p, r = _render(tokenizer, row["prompt"], resp, append_eos)
            except DataError as e:
                raise DataError(f"{data.source}, row {i}: {e}") from None
            if prompt_ids is None:
                prompt_ids = p
                if len(p) > max_prompt_length:
                    prompt_ids = p[-max_prompt_length:]
                    stats.n_prompt_truncated += 1
            budget = max_length - len(prompt_ids)
            if len(r) > budget:
                r = r[:budget]
                stats.n_response_truncated += 1
            if not r:
                raise DataError(f"{data.source}, row {i}: a response tokenises to no tokens; drop the row")
            responses.append(r)
            stats.lengths.append(len(prompt_ids) + len(r))
        items.append({"prompt_ids": prompt_ids, "response_ids": responses, "rewards": list(row["rewards"])})
        stats.n_examples += 1
    return items, stats


def collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B items of n responses -> a right-padded batch of n*B sequences, response-major:

    input_ids, attention_mask, completion_mask   [n*B, T]   rows j*B .. j*B+B-1 hold response j of every item
    rewards                                       [B, n]     higher = better (pairs: [1, 0])
    For pairs: [chosen_1..chosen_B, rejected_1..rejected_B].
    """
    n = len(items[0]["response_ids"])
    if any(len(it["response_ids"]) != n for it in items):
        raise ValueError("every example in a batch needs the same number of responses")
    seqs = [(it["prompt_ids"], r) for j in range(n) for it in items for r in [it["response_ids"][j]]]
    t = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), t), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    comp = torch.zeros((len(seqs), t), dtype=torch.long)
    for k, (p, r) in enumerate(seqs):
        ids[k, : len(p) + len(r)] = torch.tensor(p + r)
        attn[k, : len(p) + len(r)] = 1
        comp[k, len(p): len(p) + len(r)] = 1
    rewards = torch.tensor([it["rewards"] for it in items], dtype=torch.float32)  # [B, n]
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "rewards": rewards}


def collate_unpaired(items: list[dict[str, Any]], pad_token_id: int, mismatched: bool = False) -> dict[str, torch.Tensor]:
    """Unpaired items (one response each) -> collate()'s batch, rewards [B, 1] = the labels (1 desirable, 0 not).

    mismatched: also kl_input_ids, kl_attention_mask, kl_completion_mask [B, T']: prompt i with the response of item
    i - 1 (item 0 with the last), the mismatched pairs of KTO's reference point (TRL's rotation in each batch).
    """
    batch = collate(items, pad_token_id)
    if mismatched:
        shifted = [{"prompt_ids": it["prompt_ids"], "response_ids": items[i - 1]["response_ids"], "rewards": it["rewards"]}
                   for i, it in enumerate(items)]
        batch.update({f"kl_{k}": v for k, v in collate(shifted, pad_token_id).items() if k != "rewards"})
    return batch


def unpair_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tokenised pairs -> unpaired items (TRL's unpair_preference_dataset): pair i becomes item 2i, its chosen
    response with reward 1 (desirable), and item 2i + 1, its rejected response with reward 0 (undesirable)."""
    out = []
    for i, it in enumerate(items):
        if len(it["response_ids"]) != 2:
            raise ValueError(f"item {i} has {len(it['response_ids'])} responses; only pairs split into unpaired items")
        best = max(it["rewards"])
        for ids, reward in zip(it["response_ids"], it["rewards"]):
            out.append({"prompt_ids": it["prompt_ids"], "response_ids": [ids], "rewards": [float(reward == best)]})
    return out


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split into (train, held-out); the held-out part has round(fraction * N) items."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n_eval = round(fraction * len(items))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
