"""DPO and the whole preference-loss core on a transformers causal LM (`imgalign train llm-dpo`).

One training step, read top to bottom:
  1. a batch of B examples with n responses each (pairs: n = 2, chosen first), tokenised as prompt + response
  2. ONE forward of the policy over all n*B sequences ([chosen_1..chosen_B, rejected_1..rejected_B] for pairs);
     log-likelihoods summed over response tokens only (prompt and padding masked), plus response lengths
  3. the same under the reference without grad (LoRA: the same network with its adapter disabled;
     full fine-tuning: a frozen copy); skipped when every selected loss is reference-free (simpo, cpo, orpo,
     sft, pro)
  4. the loss core: pairwise losses by name (sigmoid, ipo, hinge, robust, simpo, ...) see the best and the
     worst response of each example; listwise losses (pro, lipo) see the whole list; all summed with
     loss_weights
Held-out evaluation every eval.every steps: preference accuracy = fraction of held-out pairs whose policy
log-ratio margin (l_w - lR_w) - (l_l - lR_l) is > 0 (ties count one half), and the mean margin.

Beta follows TRL (0.1 for sigmoid DPO; IPO's tau; SimPO's beta with simpo_gamma the margin itself).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgalign.config import MISSING, cfg_field
from imgalign.llm.data import collate as collate_items
from imgalign.llm.data import load_llm_preferences, pad_token_id, split_heldout, tokenize_preferences
from imgalign.llm.evaluate import HeldOut, best_worst, list_logps
from imgalign.losses import (
    LOSS_NAMES,
    REFERENCE_FREE_LOSSES,
    PairwiseInputs,
    implicit_accuracy,
    lipo_lambda_loss,
    preference_loss,
    pro_loss,
)
from imgalign.train.data_order import deterministic_loader
from imgalign.train.loop import Run, lora_layout
from imgalign.train.setup import OptimConfig, RunConfig, count_params

LISTWISE_LOSSES = ("pro", "lipo")
ALL_LOSSES = (*LOSS_NAMES, *LISTWISE_LOSSES)
REFERENCE_FREE = REFERENCE_FREE_LOSSES | {"pro"}


@dataclass
class LMConfig:
    pretrained: str = cfg_field(MISSING, "hub id or local folder of a transformers causal LM")
    tokenizer: str | None = cfg_field(None, "tokenizer hub id or folder (null: the model's)")
    revision: str | None = cfg_field(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = cfg_field(False, "allow custom modelling code from the hub (off unless you trust it)")
    attn_implementation: str | None = cfg_field(None, "eager | sdpa | flash_attention_2 (null: transformers' default)")


@dataclass
class LMLoraConfig:
    enabled: bool = cfg_field(True, "train a LoRA adapter (reference = adapter disabled); false = full fine-tuning "
                              "with a frozen reference copy")
    rank: int = cfg_field(8, "LoRA rank r")
    alpha: float | None = cfg_field(None, "LoRA alpha (null: equal to rank)")
    dropout: float = cfg_field(0.0, "LoRA dropout")
    target_modules: list[str] = cfg_field(["all-linear"], "module names that get LoRA layers; ['all-linear'] = "
                                          "every linear layer except the output head")


@dataclass
class LMDataConfig:
    source: str = cfg_field(MISSING, "preferences: a JSONL file, a saved `datasets` folder or a hub dataset id; rows "
                            "prompt/chosen/rejected (pairs) or prompt/responses/ranks|scores (lists)")
    split: str = cfg_field("train", "split name for `datasets` sources")
    eval_source: str | None = cfg_field(None, "held-out preferences (null: hold out eval_fraction of source)")
    eval_split: str = cfg_field("test", "split name of eval_source for `datasets` sources")
    eval_fraction: float = cfg_field(0.0, "with no eval_source: seeded fraction of source held out for evaluation")
    columns: dict[str, str] = cfg_field({}, "rename source columns to ours, e.g. {question: prompt}")
    max_length: int = cfg_field(512, "prompt + response tokens; responses are cut at the end")
    max_prompt_length: int = cfg_field(256, "prompt tokens; longer prompts keep their last tokens")
    append_eos: bool = cfg_field(True, "append the EOS token to plain-text responses")
    max_rows: int | None = cfg_field(None, "use only the first N training rows")
    max_eval_rows: int | None = cfg_field(512, "use only the first N held-out rows")


@dataclass
class LMLossConfig:
    loss_type: list[str] = cfg_field(["sigmoid"], "losses by name, summed with loss_weights: pairwise (imgalign.losses."
                                     "LOSS_NAMES: sigmoid, ipo, hinge, robust, simpo, ...) and listwise (pro, lipo)")
    loss_weights: list[float] | None = cfg_field(None, "one weight per loss_type (null: all 1)")
    beta: float = cfg_field(0.1, "KL strength (TRL convention; IPO's tau, SimPO's beta, LiPO's beta)", gt=0)
    params: dict[str, Any] = cfg_field({}, "extra pairwise loss parameters, e.g. {label_smoothing: 0.1, simpo_gamma: "
                                       "0.5, f_divergence: js_divergence}")

    def __post_init__(self):
        for name in self.loss_type:
            if name not in ALL_LOSSES:
                close = difflib.get_close_matches(name, ALL_LOSSES, n=1, cutoff=0.0)[0]
                raise ValueError(f"loss.loss_type: unknown loss {name!r}; did you mean {close!r}? "
                                 f"Valid: {', '.join(ALL_LOSSES)}")
        if not self.loss_type:
            raise ValueError("loss.loss_type is empty; give at least one loss, e.g. [sigmoid]")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss.loss_weights has {len(self.loss_weights)} weights for "
                             f"{len(self.loss_type)} loss types {self.loss_type}")


@dataclass
class LMEvalConfig:
    every: int = cfg_field(0, "evaluate held-out preference accuracy every N optimizer steps (0: before and after)")
    batch_size: int = cfg_field(32, "held-out examples per forward")


@dataclass
class LLMDPOConfig:
    model: LMConfig = cfg_field(LMConfig, "which causal LM to align")
    lora: LMLoraConfig = cfg_field(LMLoraConfig, "LoRA or full fine-tuning")
    data: LMDataConfig = cfg_field(LMDataConfig, "preference pairs or ranked lists")
    loss: LMLossConfig = cfg_field(LMLossConfig, "preference loss")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    eval: LMEvalConfig = cfg_field(LMEvalConfig, "held-out preference evaluation")


Config = LLMDPOConfig


# ----------------------------------------------------------------------------------------------------
# Loss


def llm_losses(logps, ref_logps, lengths, rewards, loss: LMLossConfig):
    """Per-example loss [B], implicit rewards of best and worst response [B], unweighted terms {name: [B]}.

    logps, ref_logps (None = reference-free), lengths, rewards: [B, n]. Pairwise losses read the best and the
    worst response of each example (for pairs: chosen and rejected); listwise losses the whole list.
    """
    names, weights = loss.loss_type, loss.loss_weights or [1.0] * len(loss.loss_type)
    pair_names = [n for n in names if n not in LISTWISE_LOSSES]
    l_w, l_l = best_worst(logps, rewards)
    n_w, n_l = best_worst(lengths, rewards)
    ref_w, ref_l = best_worst(ref_logps, rewards) if ref_logps is not None else (None, None)
    terms, total, chosen_r, rejected_r = {}, 0.0, None, None
    if pair_names:
        inputs = PairwiseInputs(l_w, l_l, ref_w, ref_l, n_w, n_l, chosen_nll=-l_w / n_w.clamp(min=1))
        pw = [weights[names.index(n)] for n in pair_names]
        out = preference_loss(pair_names, inputs, loss.beta, pw, **loss.params)
        total, chosen_r, rejected_r = out.losses, out.chosen_rewards, out.rejected_rewards
        terms.update(out.terms)
    elif loss.params:
        raise ValueError(f"loss.params {sorted(loss.params)} are read only by pairwise losses, not {names}")
    if "pro" in names:
        terms["pro"] = pro_loss(logps, rewards, lengths).losses
    if "lipo" in names:
        labels = (rewards[:, :, None] > rewards[:, None, :]).sum(dim=2)  # [B, n] ordinal grade, higher = better
        terms["lipo"] = lipo_lambda_loss(logps, ref_logps, labels, loss.beta).losses
    for name in LISTWISE_LOSSES:
        if name in terms:
            total = total + weights[names.index(name)] * terms[name]
    if chosen_r is None:  # listwise only: implicit rewards beta * log-ratio of best and worst
        chosen_r = loss.beta * (l_w - (ref_w if ref_w is not None else 0)).detach()
        rejected_r = loss.beta * (l_l - (ref_l if ref_l is not None else 0)).detach()
    return total, chosen_r, rejected_r, terms


# ----------------------------------------------------------------------------------------------------
# Model, weights


def load_lm(cfg: LMConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.pretrained, **kw)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, **kw, **extra)
    model.config.use_cache = False
    return model, tokenizer


def make_trainable(model, lora: LMLoraConfig, gradient_checkpointing: bool, dtype: torch.dtype):
    """-> (trainable model, frozen reference or None). LoRA: reference = the same model, adapter disabled."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
        model.requires_grad_(False)
        peft_cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                              target_modules=targets, task_type="CAUSAL_LM")  # B = 0: step 0 equals the base
        return get_peft_model(model, peft_cfg), None
    reference = copy.deepcopy(model).to(dtype).requires_grad_(False).eval()
    model.to(torch.float32).requires_grad_(True)  # trainable master weights in fp32
    return model, reference


def save_weights(model, folder: Path, lora: bool) -> None:
    """LoRA: peft's adapter_model.safetensors + adapter_config.json; full: the model in folder/model."""
    if lora:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder / "model", safe_serialization=True)


def load_weights(model, folder: Path, lora: bool) -> None:
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise RuntimeError(f"{folder}: adapter keys not in the model: {result.unexpected_keys[:5]}")
        return
    state = {}
    for f in sorted((folder / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in missing if k in params and id(params[k]) not in loaded]  # tied weights load with their twin
    if missing or unexpected:
        raise RuntimeError(f"{folder / 'model'}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _reference_logps(model, reference, batch, accelerator) -> torch.Tensor:
    """Reference summed log-likelihoods [B, n], no grad."""
    with torch.no_grad(), accelerator.autocast():
        if reference is not None:
            return list_logps(reference, batch)[0]
        with accelerator.unwrap_model(model).disable_adapter():
            return list_logps(model, batch)[0]


# ----------------------------------------------------------------------------------------------------
# Training


def _load_data(cfg: LLMDPOConfig, tokenizer, seed: int):
    d = cfg.data
    train_rows = load_llm_preferences(d.source, d.split, d.max_rows, d.columns)
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, append_eos=d.append_eos)
    items, stats = tokenize_preferences(train_rows, tokenizer, **kw)
    if d.eval_source:
        eval_rows = load_llm_preferences(d.eval_source, d.eval_split, d.max_eval_rows, d.columns)
        held, _ = tokenize_preferences(eval_rows, tokenizer, **kw)
    else:
        items, held = split_heldout(items, d.eval_fraction, seed)
        held = held[: d.max_eval_rows] if d.max_eval_rows else held
    pair_losses = [n for n in cfg.loss.loss_type if n not in LISTWISE_LOSSES]
    if train_rows.listwise and pair_losses:
        print(f"note: pairwise losses {pair_losses} read the best and the worst response of each list")
    return train_rows, items, held, stats


def train(cfg: LLMDPOConfig) -> dict:
    run = cfg.run
    book = Run(cfg, "llm-dpo")
    accelerator, dtype = book.accelerator, book.dtype
    # fail on bad loss parameters now, not after loading a large model
    z = torch.zeros(2, 2)
    llm_losses(z, z, z + 1, torch.tensor([[1.0, 0.0]] * 2), cfg.loss)

    # ---- model, tokenizer, data ----------------------------------------------------------------------
    model, tokenizer = load_lm(cfg.model, dtype)
    model, reference = make_trainable(model, cfg.lora, run.gradient_checkpointing, dtype)
    use_lora = cfg.lora.enabled
    reference_free = set(cfg.loss.loss_type) <= REFERENCE_FREE
    rows, items, held, tok_stats = _load_data(cfg, tokenizer, run.seed)
    pad_id = pad_token_id(tokenizer)

    # ---- optimizer, resume ------------------------------------------------------------------------
    model, optimizer, scheduler = book.prepare(model, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, d: save_weights(m, d, use_lora),
                                               lambda m, d: load_weights(m, d, use_lora))
    if reference is not None:
        reference.to(accelerator.device)
    book.resume()
    start_step = book.start_step
    loader = deterministic_loader(items, lambda item, index, epoch: item, lambda b: collate_items(b, pad_id),
                                  run.batch_size, run.seed, accelerator.process_index, accelerator.num_processes,
                                  start_step * run.grad_accum, grad_accum=run.grad_accum)
    heldout = HeldOut(held, pad_id, cfg.eval.batch_size, accelerator.device) if held else None

    trainable, total = count_params(model)
    book.banner("imgalign llm-dpo", {
        "model": cfg.model.pretrained,
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "none (reference-free losses)" if reference_free else
                     "same network, adapter disabled" if use_lora else "frozen copy",
        "data": f"{rows.summary()}; {len(items)} train, {len(held)} held out; {tok_stats.summary()}",
        "loss": f"{'+'.join(cfg.loss.loss_type)}, beta={cfg.loss.beta:g}"
                + (f", weights {cfg.loss.loss_weights}" if cfg.loss.loss_weights else ""),
        "effective batch": f"{run.batch_size} x {run.grad_accum} accum x {accelerator.num_processes} procs"
                           f" = {run.batch_size * run.grad_accum * accelerator.num_processes} examples/step",
    })

    def evaluate(step: int) -> dict:
        """Held-out preference accuracy on every rank (the forwards are collective under DDP)."""
        if heldout is None:
            return {}
        res = heldout.evaluate(model, lambda b: _reference_logps(model, reference, b, accelerator))
        logs = {f"eval/{k}": v for k, v in res.items()}
        book.validation.append({"step": step, **logs})
        if accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: held-out preference accuracy {res['pref_acc']:.3f}, "
                       f"mean margin {res['margin']:+.3f} ({len(held)} examples)")
        return logs

    if start_step == 0:
        accelerator.log(evaluate(0), step=0)
    book.start()

    # ---- loop ---------------------------------------------------------------------------------------
    step, micro = start_step, start_step * run.grad_accum
    data_iter = iter(loader)
    model.train()
    while step < run.max_steps:
        batch = {k: v.to(accelerator.device) for k, v in next(data_iter).items()}
        with accelerator.accumulate(model):
            loss, m = _step(model, reference, batch, cfg, accelerator, reference_free)
            book.backward(loss)
            if accelerator.sync_gradients:
                book.apply_gradients()
        book.metrics.add(m)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        logs = {f"train/{k}": v for k, v in book.metrics.reduce(accelerator).items()}
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == run.max_steps:
            logs.update(evaluate(step))
        logs = book.end_step(step, logs, {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{logs['train/rewards/accuracies']:.2f}",
                             **({"eval_acc": f"{book.validation[-1]['eval/pref_acc']:.2f}"} if book.validation else {}))

    def save_final(m):
        save_weights(m, book.out_dir, use_lora)
        tokenizer.save_pretrained(book.out_dir if use_lora else book.out_dir / "model")

    return book.finish(step, {"micro_step": micro}, save_final)


def _step(model, reference, batch, cfg: LLMDPOConfig, accelerator, reference_free: bool):
    """One micro-batch of B examples (n responses each) -> (mean loss, metrics)."""
    rewards = batch["rewards"]  # [B, n]
    with accelerator.autocast():
        logps, lengths = list_logps(model, batch)  # [B, n] each, one forward over all n*B sequences
    ref_logps = None if reference_free else _reference_logps(model, reference, batch, accelerator)
    losses, chosen, rejected, terms = llm_losses(logps, ref_logps, lengths, rewards, cfg.loss)
    l_w, l_l = best_worst(logps.detach(), rewards)
    m = {
        "loss": losses.mean().detach(),
        "rewards/accuracies": implicit_accuracy(chosen, rejected),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps_chosen": l_w.mean(),
        "logps_rejected": l_l.mean(),
    }
    if len(terms) > 1:
        m.update({f"loss_{k}": v.detach().mean() for k, v in terms.items()})
    return losses.mean(), m
