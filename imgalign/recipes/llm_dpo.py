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
Unpaired losses (kto, bco; alone or summed with each other) train on unpaired completions, n = 1: rows
{prompt, completion, label} (TRL's unpaired layout), or pairs split in two (chosen desirable, rejected undesirable;
a held-out share is taken from the pairs before the split, so held-out evaluation still sees pairs). Each reads the
log-ratio r = l - lR of one completion and a reference point: kto's z = max(0, mean of l - lR over mismatched pairs
of the batch, prompt i with completion i - 1), two extra forwards without grad, as TRL; bco's delta = the running
mean of the batch-mean rewards beta * r, kept in every checkpoint (bco_running.json).
Held-out evaluation every eval.every steps: preference accuracy = fraction of held-out pairs whose policy
log-ratio margin (l_w - lR_w) - (l_l - lR_l) is > 0 (ties count one half), and the mean margin.

Beta follows TRL (0.1 for sigmoid DPO; IPO's tau; SimPO's beta with simpo_gamma the margin itself).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from imgalign.config import MISSING, ConfigError, cfg_field, check_local_source
from imgalign.llm.data import collate as collate_items
from imgalign.llm.data import (
    collate_unpaired,
    load_llm_preferences,
    pad_token_id,
    split_heldout,
    tokenize_preferences,
    unpair_items,
)
from imgalign.llm.evaluate import HeldOut, best_worst, list_logps
from imgalign.losses import (
    LOSS_NAMES,
    REFERENCE_FREE_LOSSES,
    PairwiseInputs,
    bco_loss,
    implicit_accuracy,
    kto_loss,
    lipo_lambda_loss,
    preference_loss,
    pro_loss,
)
from imgalign.train.checkpoint import read_safetensors_folder
from imgalign.train.data_order import deterministic_loader
from imgalign.train.loop import Run, lora_layout
from imgalign.train.setup import OptimConfig, RunConfig, count_params

LISTWISE_LOSSES = ("pro", "lipo")
# unpaired losses: name -> the loss.params it reads (their reference points come from the step, see _unpaired_step)
UNPAIRED_LOSSES = {"kto": ("desirable_weight", "undesirable_weight"), "bco": ()}
ALL_LOSSES = (*LOSS_NAMES, *LISTWISE_LOSSES, *UNPAIRED_LOSSES)
REFERENCE_FREE = REFERENCE_FREE_LOSSES | {"pro"}


@dataclass
class ModelConfig:
    pretrained: str = cfg_field(MISSING, "hub id or local folder of a transformers causal LM")
    tokenizer: str | None = cfg_field(None, "tokenizer hub id or folder (null: the model's)")
    revision: str | None = cfg_field(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = cfg_field(False, "allow custom modelling code from the hub (off unless you trust it)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = cfg_field(
        None, "attention kernel (null: transformers' default)")


@dataclass
class LoraConfig:
    enabled: bool = cfg_field(True, "train a LoRA adapter (reference = adapter disabled); false = full fine-tuning "
                              "with a frozen reference copy")
    rank: int = cfg_field(8, "LoRA rank r", ge=1)
    alpha: float | None = cfg_field(None, "LoRA alpha (null: equal to rank)", gt=0)
    dropout: float = cfg_field(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = cfg_field(["all-linear"], "module names that get LoRA layers; ['all-linear'] = "
                                          "every linear layer except the output head")


@dataclass
class DataConfig:
    source: str = cfg_field(MISSING, "preferences: a JSONL file, a saved `datasets` folder or a hub dataset id; rows "
                            "prompt/chosen/rejected (pairs), prompt/responses/ranks|scores (lists) or, for kto and "
                            "bco, prompt/completion/label (unpaired, label true = desirable; pairs are split in two)")
    split: str = cfg_field("train", "split name for `datasets` sources")
    eval_source: str | None = cfg_field(None, "held-out preferences (null: hold out eval_fraction of source)")
    eval_split: str = cfg_field("test", "split name of eval_source for `datasets` sources")
    eval_fraction: float = cfg_field(0.0, "with no eval_source: seeded fraction of source held out for evaluation",
                                        ge=0, lt=1)
    columns: dict[str, str] = cfg_field({}, "rename source columns to ours, e.g. {question: prompt}")
    max_length: int = cfg_field(512, "prompt + response tokens; responses are cut at the end", ge=2)
    max_prompt_length: int = cfg_field(256, "prompt tokens; longer prompts keep their last tokens", ge=1)
    append_eos: bool = cfg_field(True, "append the EOS token to plain-text responses")
    max_rows: int | None = cfg_field(None, "use only the first N training rows", ge=1)
    max_eval_rows: int | None = cfg_field(512, "use only the first N held-out rows", ge=1)

    def __post_init__(self):
        check_local_source("data.source", self.source)
        check_local_source("data.eval_source", self.eval_source)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length} leaves no room for the response in "
                             f"data.max_length={self.max_length}; lower it or raise data.max_length")


@dataclass
class LossConfig:
    loss_type: list[str] = cfg_field(["sigmoid"], "losses by name, summed with loss_weights: pairwise (imgalign.losses."
                                     "LOSS_NAMES: sigmoid, ipo, hinge, robust, simpo, ...) and listwise (pro, lipo); "
                                     "or unpaired (kto, bco), on their own")
    loss_weights: list[float] | None = cfg_field(None, "one weight per loss_type (null: all 1)")
    beta: float = cfg_field(0.1, "KL strength (TRL convention; IPO's tau, SimPO's beta, LiPO's beta)", gt=0)
    params: dict[str, Any] = cfg_field({}, "extra pairwise loss parameters, e.g. {label_smoothing: 0.1, simpo_gamma: "
                                       "0.5, f_divergence: js_divergence}; kto: {desirable_weight: 1.0, "
                                       "undesirable_weight: 1.0}")

    def __post_init__(self):
        for name in self.loss_type:
            if name not in ALL_LOSSES:
                close = difflib.get_close_matches(name, ALL_LOSSES, n=1, cutoff=0.0)[0]
                raise ValueError(f"loss.loss_type: unknown loss {name!r}; did you mean {close!r}? "
                                 f"Valid: {', '.join(ALL_LOSSES)}")
        if not self.loss_type:
            raise ValueError("loss.loss_type is empty; give at least one loss, e.g. [sigmoid]")
        unpaired = [n for n in self.loss_type if n in UNPAIRED_LOSSES]
        if unpaired and len(unpaired) != len(self.loss_type):
            raise ValueError(f"loss.loss_type: unpaired losses {unpaired} train on single completions and cannot be "
                             f"summed with pairwise or listwise ones {[n for n in self.loss_type if n not in unpaired]}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss.loss_weights has {len(self.loss_weights)} weights for "
                             f"{len(self.loss_type)} loss types {self.loss_type}")


@dataclass
class EvalConfig:
    every: int = cfg_field(0, "evaluate held-out preference accuracy every N optimizer steps (0: before and after)",
                           ge=0)
    batch_size: int = cfg_field(32, "held-out examples per forward", ge=1)


@dataclass
class LLMDPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which causal LM to align")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "preference pairs or ranked lists")
    loss: LossConfig = cfg_field(LossConfig, "preference loss")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    eval: EvalConfig = cfg_field(EvalConfig, "held-out preference evaluation")

    def __post_init__(self):
        if "kto" in self.loss.loss_type and self.run.batch_size < 2:
            raise ValueError("run.batch_size=1: kto estimates its reference point on mismatched pairs inside the batch "
                             "(prompt i with completion i - 1), which needs run.batch_size >= 2")


Config = LLMDPOConfig


def is_unpaired(loss: LossConfig) -> bool:
    return loss.loss_type[0] in UNPAIRED_LOSSES  # the config allows no mix


# ----------------------------------------------------------------------------------------------------
# Loss


def llm_losses(logps, ref_logps, lengths, rewards, loss: LossConfig):
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
        raise ConfigError(f"loss.params {sorted(loss.params)} are read only by pairwise losses, not {names}")
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


def unpaired_losses(logratios, desirable, loss: LossConfig, kl=0.0, delta=0.0):
    """Unpaired losses by name (kto, bco) summed with loss_weights -> per-item loss [B], implicit rewards beta * r [B],
    unweighted terms {name: [B]}.

    logratios r = l - lR [B]; desirable [B] bool; kl: kto's reference point z (detached); delta: bco's shift.
    """
    names, weights = loss.loss_type, loss.loss_weights or [1.0] * len(loss.loss_type)
    readable = sorted({k for n in names for k in UNPAIRED_LOSSES[n]})
    for key in loss.params:
        if key not in readable:
            close = difflib.get_close_matches(key, readable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"loss.params: parameter {key!r} is not read by loss types {names}{hint}. Parameters "
                             f"they read: {', '.join(readable) or '(none)'}")
    p = loss.params
    run = {
        "kto": lambda: kto_loss(logratios, desirable, loss.beta, kl, p.get("desirable_weight", 1.0),
                                p.get("undesirable_weight", 1.0)),
        "bco": lambda: bco_loss(logratios, desirable, loss.beta, delta),
    }
    terms = {n: run[n]().losses for n in names}
    total = sum(w * terms[n] for n, w in zip(names, weights))
    return total, loss.beta * logratios.detach(), terms


class RunningMean:
    """BCO's delta: the running mean of the batch-mean rewards (TRL's RunningMoments), saved in every checkpoint."""

    FILE = "bco_running.json"

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def update(self, value: float) -> None:
        self.count += 1
        self.mean += (value - self.mean) / self.count

    def save(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps({"mean": self.mean, "count": self.count}))

    def load(self, folder: Path) -> None:
        state = json.loads((folder / self.FILE).read_text())
        self.mean, self.count = float(state["mean"]), int(state["count"])


# ----------------------------------------------------------------------------------------------------
# Model, weights


def load_lm(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.pretrained, **kw)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, **kw, **extra)
    model.config.use_cache = False
    return model, tokenizer


def make_trainable(model, lora: LoraConfig, gradient_checkpointing: bool, dtype: torch.dtype):
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
    state = read_safetensors_folder(folder / "model")
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
    d, names = cfg.data, cfg.loss.loss_type
    train_rows = load_llm_preferences(d.source, d.split, d.max_rows, d.columns)
    if is_unpaired(cfg.loss) and train_rows.listwise:
        raise ConfigError(f"loss.loss_type={names} trains on unpaired completions (prompt/completion/label rows) or on "
                          f"pairs split in two; data.source={d.source} holds ranked lists")
    if not is_unpaired(cfg.loss) and train_rows.unpaired:
        raise ConfigError(f"data.source={d.source} holds unpaired completions (prompt/completion/label rows), which "
                          f"train only with unpaired losses: loss.loss_type=[kto] or [bco], not {names}")
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, append_eos=d.append_eos)
    items, stats = tokenize_preferences(train_rows, tokenizer, **kw)
    if d.eval_source:
        eval_rows = load_llm_preferences(d.eval_source, d.eval_split, d.max_eval_rows, d.columns)
        held, _ = tokenize_preferences(eval_rows, tokenizer, **kw)
    else:
        items, held = split_heldout(items, d.eval_fraction, seed)  # pairs are held out whole, before any split
        held = held[: d.max_eval_rows] if d.max_eval_rows else held
    if held and len(held[0]["response_ids"]) < 2:
        print("note: the held-out data is unpaired, and held-out preference accuracy needs pairs or lists: no "
              "held-out evaluation (give data.eval_source=<pairs>)")
        held = []
    if is_unpaired(cfg.loss) and not train_rows.unpaired:
        items = unpair_items(items)  # pair i -> items 2i (chosen, desirable) and 2i + 1 (rejected, undesirable)
    pair_losses = [n for n in names if n not in LISTWISE_LOSSES]
    if train_rows.listwise and pair_losses:
        print(f"note: pairwise losses {pair_losses} read the best and the worst response of each list")
    return train_rows, items, held, stats


def train(cfg: LLMDPOConfig) -> dict:
    run = cfg.run
    book = Run(cfg, "llm-dpo")
    accelerator, dtype = book.accelerator, book.dtype
    # fail on bad loss parameters now, not after loading a large model
    z = torch.zeros(2, 2)
    if is_unpaired(cfg.loss):
        unpaired_losses(z[0], torch.tensor([True, False]), cfg.loss)
    else:
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
    running = RunningMean() if "bco" in cfg.loss.loss_type else None  # bco's delta, resumed with the checkpoint
    if running is not None:
        book.add_state("bco_running", running.save, running.load)
    book.resume()
    start_step = book.start_step
    if is_unpaired(cfg.loss):
        mismatched = "kto" in cfg.loss.loss_type  # kto's reference point needs the mismatched sequences

        def collate(b):
            return collate_unpaired(b, pad_id, mismatched)
    else:
        def collate(b):
            return collate_items(b, pad_id)
    loader = deterministic_loader(items, lambda item, index, epoch: item, collate,
                                  run.batch_size, run.seed, accelerator.process_index, accelerator.num_processes,
                                  start_step * run.grad_accum, grad_accum=run.grad_accum)
    heldout = HeldOut(held, pad_id, cfg.eval.batch_size, accelerator.device) if held else None

    trainable, total = count_params(model)
    book.banner("imgalign llm-dpo", {
        "model": cfg.model.pretrained,
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "none (reference-free losses)" if reference_free else
                     "same network, adapter disabled" if use_lora else "frozen copy",
        "data": f"{rows.summary()}; {len(items)} train{' unpaired items' if is_unpaired(cfg.loss) else ''}, "
                f"{len(held)} held out; {tok_stats.summary()}",
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
        done = book.micro_step(model, _step, model, reference, batch, cfg, accelerator, reference_free, running)
        micro += 1
        if not done:
            continue
        step += 1
        logs = book.step_metrics()
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == run.max_steps:
            logs.update(evaluate(step))
        logs = book.end_step(step, logs, {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{logs['train/rewards/accuracies']:.2f}",
                             **({"eval_acc": f"{book.validation[-1]['eval/pref_acc']:.2f}"} if book.validation else {}))

    def save_final(m):
        save_weights(m, book.out_dir, use_lora)
        tokenizer.save_pretrained(book.out_dir if use_lora else book.out_dir / "model")

    return book.finish(step, {"micro_step": micro}, save_final)


def _step(model, reference, batch, cfg: LLMDPOConfig, accelerator, reference_free: bool, running=None):
    """One micro-batch of B examples (n responses each) -> (mean loss, metrics)."""
    if is_unpaired(cfg.loss):
        return _unpaired_step(model, reference, batch, cfg, accelerator, running)
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


def _global_mean(x: torch.Tensor, accelerator) -> torch.Tensor:
    """Mean of x over this micro-batch of every process (a collective under DDP: every rank calls it), detached."""
    mean = x.detach().float().mean().reshape(1)
    if accelerator.num_processes > 1:
        mean = accelerator.reduce(mean, reduction="mean")
    return mean[0]


def _mean_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask; NaN when the micro-batch has no such item."""
    return x[mask].mean() if mask.any() else torch.tensor(math.nan)


def _unpaired_step(model, reference, batch, cfg: LLMDPOConfig, accelerator, running):
    """One micro-batch of B unpaired completions (rewards [B, 1] = labels) -> (mean loss, metrics).

    Reference points: kto's z = max(0, mean of l(y'|x) - lR(y'|x)) on the mismatched pairs of the batch (prompt i,
    completion i - 1), policy and reference without grad, averaged over processes (TRL); bco's delta = the running
    mean of the batch-mean rewards, updated with this batch first (TRL). Metrics as DPO's where they mean something:
    rewards/chosen and rewards/rejected are the mean implicit reward beta * r of desirable and undesirable items,
    rewards/margins their difference, rewards/accuracies the fraction of items on their label's side of the first
    loss's reference point (beta * z or delta; on it counts one half, so 0.5 at step 0).
    """
    names, beta = cfg.loss.loss_type, cfg.loss.beta
    desirable = batch["rewards"][:, 0] == 1  # [B]
    with accelerator.autocast():
        logps, _ = list_logps(model, batch)  # [B, 1]
    r = (logps - _reference_logps(model, reference, batch, accelerator))[:, 0]  # [B] log-ratio
    m, kl, delta = {}, torch.zeros((), device=r.device), 0.0
    if "kto" in names:
        mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")} | {"rewards": batch["rewards"]}
        with torch.no_grad(), accelerator.autocast():
            kl_logps = list_logps(model, mismatched)[0]
        kl = _global_mean(kl_logps - _reference_logps(model, reference, mismatched, accelerator), accelerator)
        kl = kl.clamp(min=0).to(r.device)
        m["kl"] = kl
    if running is not None:  # bco
        running.update(float(_global_mean(beta * r, accelerator)))
        delta = running.mean
        m["delta"] = delta
    losses, rewards, terms = unpaired_losses(r, desirable, cfg.loss, kl=kl, delta=delta)
    point = beta * kl if names[0] == "kto" else torch.tensor(delta, device=r.device)
    signed = torch.where(desirable, rewards - point, point - rewards)  # > 0: on the label's side
    chosen, rejected = _mean_where(rewards, desirable), _mean_where(rewards, ~desirable)
    m.update({
        "loss": losses.mean().detach(),
        "rewards/accuracies": implicit_accuracy(signed, torch.zeros_like(signed)),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps_chosen": _mean_where(logps[:, 0].detach(), desirable),
        "logps_rejected": _mean_where(logps[:, 0].detach(), ~desirable),
    })
    if len(terms) > 1:
        m.update({f"loss_{k}": v.detach().mean() for k, v in terms.items()})
    return losses.mean(), m
