"""LLM side: sequence log-likelihoods of causal LMs, preference data, held-out evaluation, a synthetic task.

The recipe that trains with them is imgalign.recipes.llm_dpo (`imgalign train llm-dpo`); the losses are the
shared core in imgalign.losses.
"""

from imgalign.llm.data import (
    LLMPreferences,
    collate,
    load_llm_preferences,
    pad_token_id,
    split_heldout,
    tokenize_preferences,
)
from imgalign.llm.evaluate import HeldOut, best_worst, list_logps
from imgalign.llm.logprobs import (
    PairLogps,
    concatenated_pair_logps,
    masked_sequence_logps,
    sequence_logps,
    token_logps,
)

__all__ = [
    "HeldOut",
    "LLMPreferences",
    "PairLogps",
    "best_worst",
    "collate",
    "concatenated_pair_logps",
    "list_logps",
    "load_llm_preferences",
    "masked_sequence_logps",
    "pad_token_id",
    "sequence_logps",
    "split_heldout",
    "token_logps",
    "tokenize_preferences",
]
