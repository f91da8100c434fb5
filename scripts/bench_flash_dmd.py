"""Flash-DMD's memory: the LoRA-shared layout (student and fake score as two adapters on the one teacher) against full
copies (teacher, student and fake score as separate networks, each trained one with its AdamW state), on the same
model: an SD1.5-architecture pipeline with random weights (`imgalign.models.tiny.save_sd15_architecture`; UNet width
--unet-width, 320 = SD1.5's 860M UNet, 160 = a quarter of its parameters so full copies fit a 24 GB CPU machine).

Each layout trains --steps steps (TTUR 1: the critic and the student both update every step) of 1 prompt at 64 px in
its own process; the peak resident memory of each is printed beside a process that only loads the pipeline.

    python scripts/bench_flash_dmd.py --unet-width 160 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def child(args) -> None:
    import torch

    torch.set_num_threads(2)
    pipe = args.dir / f"sd15-arch-{args.unet_width}"
    if args.child == "load":
        from imgalign.models.adapters import load_adapter

        load_adapter(str(pipe)).freeze_all()
    else:
        from imgalign.config import load_config
        from imgalign.recipes import flash_dmd

        (args.dir / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
        flash_dmd.train(load_config(flash_dmd.Config, None, [
            f"model.pretrained={pipe}", f"data.prompts={args.dir / 'prompts.txt'}", "data.resolution=64",
            f"lora.enabled={args.child == 'lora'}", "lora.rank=8", "dmd.ttur=1", "dmd.split_threshold=null",
            "dmd.gan_weight=0", f"run.output_dir={args.dir / ('run-' + args.child)}", f"run.max_steps={args.steps}",
            "run.batch_size=1", "run.checkpoint_every=0", "run.progress=false", "run.log_with=none",
            "validation.enabled=false"]))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-width", type=int, default=160)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("outputs/flash_dmd_memory"), help="pipeline and runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from imgalign.models.tiny import save_sd15_architecture

    args.dir.mkdir(parents=True, exist_ok=True)
    save_sd15_architecture(args.dir / f"sd15-arch-{args.unet_width}", unet_width=args.unet_width)
    peaks = {}
    for mode in ("load", "lora", "full"):
        cmd = [sys.executable, __file__, "--child", mode, "--unet-width", str(args.unet_width), "--steps",
               str(args.steps), "--dir", str(args.dir)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[mode] = json.loads(out)["peak_mb"]
    print(f"[memory] SD1.5 architecture, UNet width {args.unet_width}, random weights; flash-dmd {args.steps} steps "
          "(TTUR 1) of 1 prompt at 64 px; peak RSS per process:")
    for mode, mb in peaks.items():
        print(f"  {mode:<6}{mb:>9.0f} MB")
    print(f"  LoRA-shared / full copies: {peaks['lora'] / peaks['full']:.3f}x (target <= 0.6x)")


if __name__ == "__main__":
    main()
