"""LLM DPO end to end on a tiny Llama (loaded by path) and the synthetic sort preference task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import ConfigError, load_config
from imgalign.llm.synthetic import build_sort_assets, sort_task, write_jsonl
from imgalign.recipes import get_recipe, llm_dpo


@pytest.fixture(scope="module")
def sort_assets(tmp_path_factory):
    return build_sort_assets(tmp_path_factory.mktemp("llm_sort"), n_train=256, n_heldout=96, seed=0)


def make_cfg(assets, out: Path, *extra: str):
    return load_config(llm_dpo.Config, None, [
        f"model.pretrained={assets['model']}", f"data.source={assets['train']}",
        f"data.eval_source={assets['heldout']}", "data.max_length=32", "data.max_prompt_length=16",
        f"run.output_dir={out}", "run.max_steps=3", "run.batch_size=8", "run.checkpoint_every=0",
        "run.progress=false", "run.log_with=none", "optim.lr=3e-3", "optim.weight_decay=0", "lora.rank=4",
        "eval.batch_size=96", *extra,
    ])


def initial_lora(assets, rank: int = 4) -> dict[str, torch.Tensor]:
    """The adapter exactly as train() creates it: same seed, same loading and peft calls."""
    from accelerate.utils import set_seed
    from peft import get_peft_model_state_dict

    set_seed(0)
    cfg = llm_dpo.LoraConfig(rank=rank)
    model, _ = llm_dpo.load_lm(llm_dpo.ModelConfig(pretrained=assets["model"]), torch.float32)
    model, _ = llm_dpo.make_trainable(model, cfg, False, torch.float32)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def test_heldout_accuracy_rises_and_every_lora_param_changes(sort_assets, tmp_path):
    out = tmp_path / "run"
    result = llm_dpo.train(make_cfg(sort_assets, out, "run.max_steps=60", "eval.every=20", "run.log_with=tensorboard"))
    hist, evals = result["history"], result["validation"]
    assert [e["step"] for e in evals] == [0, 20, 40, 60]

    # before any update the LoRA is zero: policy == reference, loss log 2, every held-out margin exactly 0
    assert evals[0]["eval/pref_acc"] == 0.5 and evals[0]["eval/margin"] == 0.0
    assert hist[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert hist[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    # the known truth is learned on held-out prompts: sorted beats swapped
    assert evals[-1]["eval/pref_acc"] >= 0.8, evals
    assert evals[-1]["eval/margin"] > 0.3
    late = hist[-10:]
    assert sum(h["train/loss"] for h in late) / len(late) < math.log(2) - 0.02
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps_chosen", "logps_rejected", "lr"):
        assert math.isfinite(hist[-1][f"train/{key}"])

    # every LoRA parameter changed (B starts at 0, A at a seeded draw)
    trained = load_file(str(out / "adapter_model.safetensors"))
    initial = initial_lora(sort_assets)
    assert trained.keys() == initial.keys() and trained
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, unchanged[:5]

    # artifacts: run record, TensorBoard events, final checkpoint; the adapter loads with peft and changes logits
    assert {"config.yaml", "versions.json", "git_revision.txt"} <= {p.name for p in out.iterdir()}
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "checkpoint-60" / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(sort_assets["model"])
    ids = AutoTokenizer.from_pretrained(out)("sort 4 2 7 -> 2 4 7", return_tensors="pt")["input_ids"]
    before = base(ids).logits
    after = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kill_and_resume_equals_uninterrupted(lora, sort_assets, tmp_path, run_killed, assert_same_continuation):
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.grad_accum=2", "run.keep_last=0",
             "optim.lr_scheduler=cosine", "optim.warmup_steps=1", "eval.every=2", f"lora.enabled={str(lora).lower()}",
             "optim.lr=1e-3")
    full = llm_dpo.train(make_cfg(sort_assets, tmp_path / "full", *extra))

    # micro-steps 1-4 = steps 1-2; die in step 3
    run_killed(llm_dpo, "_step", 6,
               lambda: llm_dpo.train(make_cfg(sort_assets, tmp_path / "killed", *extra)))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    (tmp_path / "killed" / ".checkpoint-4.tmp").mkdir()  # a half-written save is never picked up

    resumed = llm_dpo.train(make_cfg(sort_assets, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    w = "adapter_model.safetensors" if lora else "model/model.safetensors"
    assert_same_continuation(full["history"], resumed["history"],
                             ("train/loss", "train/rewards/margins", "eval/pref_acc", "eval/margin"),
                             [(tmp_path / "full" / w, tmp_path / "killed" / w)], rel=0, abs=1e-6)
    assert_same_continuation(full["history"], resumed["history"], ("train/lr",), rel=1e-9, abs=0)


def test_full_finetuning_uses_a_frozen_reference(sort_assets, tmp_path):
    out = tmp_path / "full"
    result = llm_dpo.train(make_cfg(sort_assets, out, "lora.enabled=false", "run.max_steps=2", "optim.lr=1e-3"))
    assert result["history"][0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sort_assets["model"])
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters())]
    assert sum(changed) / len(changed) > 0.9


@pytest.mark.parametrize("losses", [
    ["ipo"], ["hinge"], ["robust"], ["simpo"], ["orpo"], ["sigmoid", "sft"], ["pro"], ["lipo"],
], ids="+".join)
def test_every_loss_family_trains(losses, sort_assets, tmp_path):
    """Pairwise, length-normalised, reference-free and listwise losses (n = 2) run, stay finite, and move
    the held-out margin in the preferred direction within a few steps."""
    names = "[" + ",".join(losses) + "]"
    extra = ["run.max_steps=8", f"loss.loss_type={names}"]
    if losses == ["simpo"]:
        extra += ["loss.beta=2.0", "loss.params={simpo_gamma: 0.5}"]
    if losses == ["sigmoid", "sft"]:
        extra += ["loss.loss_weights=[1.0,0.1]"]
    result = llm_dpo.train(make_cfg(sort_assets, tmp_path / "r", *extra))
    assert all(math.isfinite(h["train/loss"]) for h in result["history"])
    assert result["validation"][-1]["eval/margin"] > 0
    if len(losses) > 1:
        assert {f"train/loss_{n}" for n in losses} <= set(result["history"][-1])


def test_reference_free_losses_skip_the_reference_forward(sort_assets, tmp_path, monkeypatch):
    """simpo reads no reference: training never runs one; held-out evaluation runs it once (cached)."""
    real, calls = llm_dpo._reference_logps, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(llm_dpo, "_reference_logps", counting)
    llm_dpo.train(make_cfg(sort_assets, tmp_path / "s", "run.max_steps=3", "loss.loss_type=[simpo]", "eval.every=1"))
    assert calls["n"] == 1  # one held-out batch, cached across the 4 evaluations
    calls["n"] = 0
    llm_dpo.train(make_cfg(sort_assets, tmp_path / "d", "run.max_steps=3", "eval.every=1"))
    assert calls["n"] == 1 + 3  # held-out once, then one reference forward per training step


def test_cli_runs_the_shipped_tiny_config(sort_assets, tmp_path, capsys):
    """`imgalign train llm-dpo --config configs/llm_dpo/tiny.yaml key=value ...` (in process: same parser)."""
    from imgalign.cli import main

    code = main(["train", "llm-dpo", f"model.pretrained={sort_assets['model']}", f"data.source={sort_assets['train']}",
                 f"data.eval_source={sort_assets['heldout']}", f"run.output_dir={tmp_path / 'cli'}", "run.max_steps=2",
                 "run.progress=false", "run.log_with=none", "--config", "configs/llm_dpo/tiny.yaml"])
    assert code == 0
    assert "imgalign llm-dpo" in capsys.readouterr().out
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()


def test_listwise_data_with_pro_lipo_and_a_pairwise_loss(sort_assets, tmp_path):
    """Lists of 3 (sorted, one swap, reversed) ranked 1, 2, 3. PRO and LiPO see the list; sigmoid DPO sees
    the best and the worst response."""
    rows = []
    for r in sort_task(64, seed=5):
        rows.append({"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"], " ".join(r["chosen"].split()[::-1])],
                     "ranks": [2, 1, 3]})
    path = write_jsonl(rows, tmp_path / "lists.jsonl")
    cfg = make_cfg(sort_assets, tmp_path / "r", f"data.source={path}", "data.eval_source=null",
                   "data.eval_fraction=0.25", "run.max_steps=4", "loss.loss_type=[pro,lipo,sigmoid]",
                   "loss.loss_weights=[1.0,1.0,0.5]")
    result = llm_dpo.train(cfg)
    last = result["history"][-1]
    assert {"train/loss_pro", "train/loss_lipo", "train/loss_sigmoid"} <= set(last)
    assert math.isfinite(last["train/loss"]) and result["validation"][0]["eval/pref_acc"] == 0.5


def test_unknown_loss_name_and_parameter_errors(sort_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown loss 'sigmod'; did you mean 'sigmoid'"):
        make_cfg(sort_assets, tmp_path, "loss.loss_type=[sigmod]")
    with pytest.raises(ConfigError, match=r"2 weights for 1 loss types"):
        make_cfg(sort_assets, tmp_path, "loss.loss_weights=[1.0,2.0]")
    # a parameter no selected loss reads fails before the model is loaded, naming the closest
    with pytest.raises(ValueError, match=r"'label_smothing'.*did you mean 'label_smoothing'"):
        llm_dpo.train(make_cfg(sort_assets, tmp_path / "p", "loss.params={label_smothing: 0.1}"))


def test_recipe_is_registered_and_shipped_configs_parse(in_folder_with_outputs):
    assert get_recipe("llm-dpo") is llm_dpo
    paths = sorted(Path("configs/llm_dpo").resolve().glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        in_folder_with_outputs(path)  # tiny.yaml reads the data `python -m imgalign.llm.synthetic` writes
        cfg = load_config(llm_dpo.Config, path)
        assert cfg.loss.beta > 0 and cfg.model.pretrained and cfg.data.source


# ---- unpaired losses: KTO and BCO -----------------------------------------------------------------------------


def unpaired_rows(n: int, seed: int) -> list[dict]:
    """One completion per prompt of the sort task (TRL's unpaired layout): even rows the sorted answer (label true),
    odd rows a swapped one (label false)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(sort_task(n, seed=seed))]


@pytest.mark.parametrize("source", ["unpaired", "pairs"])
@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_unpaired_losses_train_on_unpaired_rows_and_split_pairs(loss, source, sort_assets, tmp_path):
    """kto and bco, 2 steps, on unpaired rows and on the sort pairs split in two (chosen desirable, rejected not).

    Step 1 runs before any update: the LoRA is zero, so every log-ratio r = l - lR is 0, and so is kto's reference
    point z = max(0, mean r over the mismatched pairs) and bco's delta (the running mean of batch-mean rewards 0).
    kto: each item costs 1 - sigma(beta * (0 - 0)) = 1 - 1/2 = 0.5, so the loss is 0.5;
    bco: each item costs -log sigma(+-(0 - 0)) = log 2 = 0.693147. Every item sits on its reference point:
    rewards/accuracies 0.5."""
    data = sort_assets["train"] if source == "pairs" else write_jsonl(unpaired_rows(128, seed=3), tmp_path / "u.jsonl")
    out = tmp_path / "run"
    result = llm_dpo.train(make_cfg(sort_assets, out, f"data.source={data}", "run.max_steps=2",
                                    f"loss.loss_type=[{loss}]"))
    hist = result["history"]
    assert hist[0]["train/loss"] == pytest.approx(0.5 if loss == "kto" else math.log(2), abs=1e-6)
    assert hist[0]["train/rewards/accuracies"] == 0.5
    assert all(math.isfinite(h["train/loss"]) for h in hist)
    assert ("train/kl" in hist[0]) == (loss == "kto") and ("train/delta" in hist[0]) == (loss == "bco")
    # held-out evaluation still sees pairs (data.eval_source): untouched LoRA -> 0.5
    assert result["validation"][0]["eval/pref_acc"] == 0.5
    trained = load_file(str(out / "adapter_model.safetensors"))
    initial = initial_lora(sort_assets)
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert trained.keys() == initial.keys() and not unchanged, unchanged[:5]
    if loss == "bco":  # delta is run state: saved with the checkpoint, resumed from it
        state = json.loads((out / "checkpoint-2" / "bco_running.json").read_text())
        assert state["count"] == 2 and math.isfinite(state["mean"])


def test_unpaired_rows_split_pairs_and_mismatched_batch():
    """Pairs split into unpaired items (chosen 1, rejected 0); kto's mismatched batch pairs prompt i with response
    i - 1 (item 0 with the last), TRL's rotation."""
    from imgalign.llm.data import collate_unpaired, unpair_items

    items = [{"prompt_ids": [1, 2], "response_ids": [[5], [6, 6]], "rewards": [1.0, 0.0]},
             {"prompt_ids": [3], "response_ids": [[7, 7, 7], [8]], "rewards": [1.0, 0.0]}]
    un = unpair_items(items)
    assert [(u["prompt_ids"], u["response_ids"], u["rewards"]) for u in un] == [
        ([1, 2], [[5]], [1.0]), ([1, 2], [[6, 6]], [0.0]), ([3], [[7, 7, 7]], [1.0]), ([3], [[8]], [0.0])]
    batch = collate_unpaired(un[1:3], pad_token_id=0, mismatched=True)
    assert batch["rewards"].tolist() == [[0.0], [1.0]]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 7, 7, 7], [3, 6, 6, 0, 0]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]


def test_unpaired_data_errors(sort_assets, tmp_path):
    """A bad label names the file and the line; unpaired rows need an unpaired loss; kto needs a batch of >= 2."""
    from imgalign.data.errors import DataError
    from imgalign.llm.data import load_llm_preferences

    rows = unpaired_rows(4, seed=1)
    rows[2]["label"] = "yes"
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=rf"{bad}, line 3: 'label' = yes is invalid; label must be true"):
        load_llm_preferences(bad)
    with pytest.raises(DataError, match=r"line 3"):
        llm_dpo.train(make_cfg(sort_assets, tmp_path / "b", f"data.source={bad}", "loss.loss_type=[kto]"))
    good = write_jsonl(unpaired_rows(8, seed=1), tmp_path / "u.jsonl")
    assert "4 desirable, 4 undesirable" in load_llm_preferences(good).summary()
    with pytest.raises(ConfigError, match=r"unpaired completions.*loss.loss_type=\[kto\] or \[bco\]"):
        llm_dpo.train(make_cfg(sort_assets, tmp_path / "s", f"data.source={good}"))
    with pytest.raises(ConfigError, match=r"run.batch_size=1.*kto"):
        make_cfg(sort_assets, tmp_path, "loss.loss_type=[kto]", "run.batch_size=1")
    with pytest.raises(ConfigError, match=r"cannot be summed with pairwise"):
        make_cfg(sort_assets, tmp_path, "loss.loss_type=[kto,sigmoid]")
    with pytest.raises(ValueError, match=r"'desirable_weigth'.*did you mean 'desirable_weight'"):
        llm_dpo.train(make_cfg(sort_assets, tmp_path / "p", "loss.loss_type=[kto]",
                               "loss.params={desirable_weigth: 1.0}"))
