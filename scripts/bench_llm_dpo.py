"""Held-out accuracy and margin curves of several preference losses on the synthetic sort task (CPU).

Each loss trains the same tiny Llama (LoRA r=8, same seed, same data order, same learning rate) with
`imgalign.recipes.llm_dpo.train`; held-out preference accuracy (log-ratio margin > 0 against the
reference, ties 1/2) and the mean margin are measured every --eval-every steps on pairs whose prompts were
never trained on. Prints a table, writes results.json, table.md and curves.png to --out.

    python scripts/bench_llm_dpo.py --out outputs/bench_llm_dpo            # about 3-4 minutes on 1 core
    python scripts/bench_llm_dpo.py --losses sigmoid ipo --steps 100       # a subset

What to expect: every loss learns the preference (accuracy 0.5 -> ~1); they differ in how far they push
the margin. hinge stops once beta * margin passes 1, IPO regresses the per-token margin toward 1/(2 beta),
sigmoid and robust keep pushing; reference-free SimPO / ORPO / PRO are scored against the reference only
for the table. The NLL terms of RPO (sigmoid + sft) and ORPO raise the chosen log-likelihood more.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# name -> (loss_type list, beta, extra overrides)
LOSSES: dict[str, tuple[list[str], float, list[str]]] = {
    # beta = 2 puts the reference-based losses past their linear regime within the run (beta * margin > 1),
    # where they differ: hinge stops at margin 1/beta = 0.5, IPO regresses the per-token margin to
    # 1/(2 beta) = 0.25, sigmoid and robust keep pushing.
    "sigmoid": (["sigmoid"], 2.0, []),
    "ipo": (["ipo"], 2.0, []),
    "hinge": (["hinge"], 2.0, []),
    "robust": (["robust"], 2.0, ["loss.params={label_smoothing: 0.1}"]),
    "apo_zero": (["apo_zero"], 2.0, []),
    "rpo": (["sigmoid", "sft"], 2.0, ["loss.loss_weights=[1.0,1.0]"]),
    "simpo": (["simpo"], 2.0, ["loss.params={simpo_gamma: 1.0}"]),  # per-token margin target gamma / beta
    "orpo": (["orpo"], 0.1, []),  # beta = lambda, the weight of the odds-ratio term next to the NLL
    "pro": (["pro"], 1.0, []),  # reference-free, no beta (PRO's temperatures are the reward gaps)
    # unpaired: each pair split into a desirable and an undesirable completion (the same data, twice the rows)
    "kto": (["kto"], 2.0, []),
    "bco": (["bco"], 2.0, []),
}


def ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def run_one(name: str, assets: dict, out: Path, args) -> dict:
    from imgalign.config import load_config
    from imgalign.recipes import llm_dpo

    types, beta, extra = LOSSES[name]
    beta = beta * args.beta_scale
    cfg = load_config(llm_dpo.Config, None, [
        f"model.pretrained={assets['model']}", f"data.source={assets['train']}",
        f"data.eval_source={assets['heldout']}", "data.max_length=32", "data.max_prompt_length=16",
        f"loss.loss_type=[{','.join(types)}]", f"loss.beta={beta}", *extra,
        f"optim.lr={args.lr}", "optim.lr_scheduler=constant", "optim.weight_decay=0",
        f"run.output_dir={out / 'runs' / name}", f"run.max_steps={args.steps}", f"run.batch_size={args.batch_size}",
        "run.checkpoint_every=0", "run.progress=false", "run.log_with=none", f"run.seed={args.seed}",
        "lora.rank=8", f"eval.every={args.eval_every}", "eval.batch_size=128",
    ])
    t0 = time.time()
    res = llm_dpo.train(cfg)
    hist = res["history"]
    k = min(10, len(hist))
    return {
        "loss": name, "loss_type": types, "beta": beta, "seconds": time.time() - t0,
        "evals": res["validation"],
        "train_logps": [(h["step"], h["train/logps_chosen"], h["train/logps_rejected"]) for h in hist],
        "train_logps_chosen_start": hist[0]["train/logps_chosen"],
        "train_logps_chosen_end": sum(h["train/logps_chosen"] for h in hist[-k:]) / k,
        "train_logps_rejected_start": hist[0]["train/logps_rejected"],
        "train_logps_rejected_end": sum(h["train/logps_rejected"] for h in hist[-k:]) / k,
    }


def first_step_reaching(evals: list[dict], level: float) -> str:
    for e in evals:
        if e["eval/pref_acc"] >= level:
            return str(e["step"])
    return "-"


def table(results: list[dict], n_heldout: int) -> str:
    head = ("| loss | beta | acc@0 | steps to acc>=0.9 | final acc (95% CI) | final margin | "
            "policy-only acc | d logp chosen | d logp rejected |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        e0, e1 = r["evals"][0], r["evals"][-1]
        acc = e1["eval/pref_acc"]
        lines.append(
            f"| {r['loss']} | {r['beta']:g} | {e0['eval/pref_acc']:.2f} | {first_step_reaching(r['evals'], 0.9)} | "
            f"{acc:.3f} ± {ci95(acc, n_heldout):.3f} | {e1['eval/margin']:+.2f} | {e1['eval/logp_acc']:.3f} | "
            f"{r['train_logps_chosen_end'] - r['train_logps_chosen_start']:+.2f} | "
            f"{r['train_logps_rejected_end'] - r['train_logps_rejected_start']:+.2f} |")
    return "\n".join(lines)


def running_mean(xs, k: int = 10) -> list[float]:
    """Mean over the last k values (single training batches are noisy)."""
    return [sum(xs[max(0, j - k + 1): j + 1]) / len(xs[max(0, j - k + 1): j + 1]) for j in range(len(xs))]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, r in enumerate(results):
        colour = f"C{i}"
        steps = [e["step"] for e in r["evals"]]
        ax1.plot(steps, [e["eval/pref_acc"] for e in r["evals"]], label=r["loss"], color=colour)
        ax2.plot(steps, [e["eval/margin"] for e in r["evals"]], label=r["loss"], color=colour)
        t, lw, ll = zip(*r["train_logps"])
        ax3.plot(t, running_mean(lw), color=colour, label=f"{r['loss']} chosen")
        ax3.plot(t, running_mean(ll), color=colour, ls=":")
    ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="optimizer step", ylabel="held-out preference accuracy", title="accuracy (margin > 0)")
    ax2.set(xlabel="optimizer step", ylabel="mean held-out log-ratio margin (nats)", title="margin vs reference")
    ax3.set(xlabel="optimizer step", ylabel="train log-likelihood (summed)",
            title="chosen (solid) and rejected (dotted) log p")
    ax1.legend(fontsize=8)
    fig.suptitle("LLM preference losses on the synthetic sort task (tiny Llama, LoRA r=8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench_llm_dpo")
    p.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-heldout", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta-scale", type=float, default=1.0, help="multiply every loss's beta")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model is fastest on 1)")
    args = p.parse_args(argv)

    import torch

    from imgalign.llm.synthetic import build_sort_assets

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    assets = build_sort_assets(out / "assets", args.n_train, args.n_heldout, seed=args.seed)
    results = []
    for name in args.losses:
        print(f"--- {name}", flush=True)
        results.append(run_one(name, assets, out, args))
    text = table(results, args.n_heldout)
    print()
    print(f"sort task: {args.n_train} train / {args.n_heldout} held-out pairs, {args.steps} steps, batch "
          f"{args.batch_size}, lr {args.lr:g}, seed {args.seed}")
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, out / "curves.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
