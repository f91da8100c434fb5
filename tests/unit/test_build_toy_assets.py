"""Helpers of scripts/build_toy_assets.py: batch shares per prompt kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "build_toy_assets", Path(__file__).resolve().parents[2] / "scripts" / "build_toy_assets.py")
build = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(build)

PROMPTS = ["a red circle", "two blue squares", "a red circle and a blue square",
           "a green triangle left of a red circle on a white background"]


def test_kind_row_weights_give_each_kind_its_share():
    index = np.array([0, 0, 0, 1, 2, 2, 3])  # image -> prompt: 3 single, 1 count, 2 pair, 1 relation
    w = build.kind_row_weights(PROMPTS, index, "single=0.4,count=0.2,pair=0.2,relation=0.2").numpy()
    np.testing.assert_allclose(w, [0.4 / 3] * 3 + [0.2] + [0.1] * 2 + [0.2])
    assert build.kind_row_weights(PROMPTS, index, "uniform") is None
    with pytest.raises(ValueError, match="kinds"):
        build.kind_row_weights(PROMPTS, index, "single=0.5,triangles=0.5")


def test_evaluate_pipeline_reports_the_rater_beside_fidelity():
    """The build's eval table: fidelity criteria, the toy rater's taste (prompts without a background only)
    and preference, each the mean over the images the shipped toy SD draws."""
    from imgalign.models.adapters import load_adapter
    from imgalign.toy.evaluator import evaluate

    sd = Path(__file__).resolve().parents[2] / "assets" / "toy" / "sd"
    if not (sd / "model_index.json").is_file():
        pytest.skip("toy SD not built")
    summary = build.evaluate_pipeline(sd, PROMPTS, steps=4, cfg=5.0, seed=0)
    pipe = load_adapter(str(sd)).pipe  # the same call as the build's eval: one batch, generator seeded with seed
    images = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  output_type="np", height=32, width=32).images
    scores = [evaluate(im, p) for im, p in zip(images, PROMPTS)]
    assert summary["preference"] == pytest.approx(np.mean([s.preference for s in scores]))
    assert summary["taste"] == pytest.approx(np.mean([s.taste for s in scores[:3]]))  # the 4th states a background
    assert summary["score"] == pytest.approx(np.mean([s.score for s in scores]))
    assert summary["watermark"] == pytest.approx(np.mean([s.watermark for s in scores]))
    assert summary["watermarked"] == pytest.approx(np.mean([s.watermarked for s in scores]))


def _chain_steps(lane_steps, flag):
    return [int(argv[argv.index(flag) + 1]) for _, _, argv in lane_steps if flag in argv]


def test_shipped_chain_reproduces_the_manifests_phases():
    """`--chain shipped` is the recipe of the shipped assets: its phases add up to the step counts the manifest
    recorded, with the watermark fractions it recorded (a chain that drifts from the assets fails here)."""
    import json

    manifest = json.loads((Path(__file__).resolve().parents[2] / "assets/toy/manifest.json").read_text())
    lanes = build.shipped_chain("/tmp/w", "assets/toy")
    steps = [s for lane in lanes.values() for s in lane]
    for name in ("sd", "sd3"):
        phase1 = [(s, a, argv) for s, a, argv in steps if argv[:2] == ["--only", name] and "--resume" not in argv]
        assert len(phase1) == 1
        total = sum(_chain_steps(phase1, f"--{name}-steps")) + sum(_chain_steps(steps, f"--{name}-phase2-steps"))
        assert total == manifest[name]["total_steps"], name
    wm_sd = next(argv for step, _, argv in steps if step == "sd_4_watermark")
    assert float(wm_sd[wm_sd.index("--watermark-fraction") + 1]) == manifest["sd"]["watermark_fraction"]
    wm_vae = next(argv for step, _, argv in steps if step == "vae_watermark")
    assert float(wm_vae[wm_vae.index("--vae-watermark-fraction") + 1]) == manifest["vae"]["watermark_fraction"]
    assert int(wm_vae[wm_vae.index("--vae-steps") + 1]) == manifest["vae"]["steps"]
    # phase 4 reads the watermark decoder from the work dir the decoder step wrote
    assert wm_sd[wm_sd.index("--work-dir") + 1] == wm_vae[wm_vae.index("--work-dir") + 1] != "/tmp/w"
    # so do sd3's watermark phases, after it in the same lane, at the fraction the manifest recorded
    lane_b = [step for step, _, _ in lanes["b"]]
    for step in ("sd3_5_watermark", "sd3_6_watermark", "sd3_7_text_layer", "sd3_8_pairs"):
        argv = next(argv for name, _, argv in steps if name == step)
        assert lane_b.index(step) > lane_b.index("vae_watermark")
        assert argv[argv.index("--work-dir") + 1] == wm_vae[wm_vae.index("--work-dir") + 1]
        assert float(argv[argv.index("--watermark-fraction") + 1]) == manifest["sd3"]["watermark_fraction"]
        assert argv[argv.index("--sd3-timestep-sampling") + 1] == manifest["sd3"]["timestep_sampling"]
    # the text-layer phases and every later one rebuild the towers with the identity layer the shipped sd3 has
    last = next(argv for name, _, argv in steps if name == lane_b[lane_b.index("eval_sd3") - 1])
    assert int(last[last.index("--sd3-text-identity-layers") + 1]) == manifest["sd3"]["text_identity_layers"]
    assert last[last.index("--kind-weights") + 1] == manifest["sd3"]["kind_weights"]


def test_eval_of_one_model_keeps_the_others_entry(tmp_path, monkeypatch):
    """The chain evaluates sd and sd3 on different lanes: `--eval-models sd3` replaces only sd3's eval_test entry."""
    import argparse
    import json

    for name in ("sd", "sd3"):
        (tmp_path / name).mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"eval_test": {"sd": {"overall": 0.3}, "sd3": {"overall": 0.1}}}))
    monkeypatch.setattr(build, "ASSETS", tmp_path)
    monkeypatch.setattr(build, "evaluate_pipeline", lambda path, *a: {"overall": 0.2, "model": Path(path).name})
    build.stage_eval(argparse.Namespace(eval_steps=2, eval_cfg=5.0, seed=0, eval_models=["sd3"]))
    entry = json.loads((tmp_path / "manifest.json").read_text())["eval_test"]
    assert entry["sd"] == {"overall": 0.3}
    assert entry["sd3"]["overall"] == 0.2 and entry["sd3"]["model"] == "sd3" and entry["num_inference_steps"] == 2


def test_run_chain_orders_the_lanes_and_stops_on_failure(tmp_path, monkeypatch, capsys):
    """The runner starts a step only after the step it waits for finished, and a failing step stops both lanes."""
    import argparse
    import threading

    finished, calls, lock = [], [], threading.Lock()

    def fake_call(cmd, fail=None, **kwargs):
        step = kwargs["stdout"].name.rsplit("/", 1)[-1][:-4]
        with lock:
            calls.append((step, list(finished)))
        if step == fail:
            return 3
        with lock:
            finished.append(step)
        return 0

    args = argparse.Namespace(work_dir=str(tmp_path / "w"), assets=str(tmp_path / "a"), threads=1, dry_run=False)
    monkeypatch.setattr(build.subprocess, "call", fake_call)
    build.run_chain(args)
    seen = dict(calls)
    lanes = build.shipped_chain(args.work_dir, args.assets)
    assert set(seen) == {step for lane in lanes.values() for step, _, _ in lane}
    for lane in lanes.values():
        for i, (step, after, _) in enumerate(lane):
            if after:
                assert after in seen[step], (step, after)
            if i:
                assert lane[i - 1][0] in seen[step]
    assert (tmp_path / "w" / "logs" / "clip.log").is_file()

    calls.clear()
    finished.clear()
    monkeypatch.setattr(build.subprocess, "call", lambda cmd, **kw: fake_call(cmd, fail="vae", **kw))
    with pytest.raises(SystemExit, match="vae"):
        build.run_chain(args)
    started = {step for step, _ in calls}
    assert "sd_1" not in started and "sd3_1" not in started  # both wait on a step that never finished


@pytest.mark.parametrize("copies", [[1, 7, 40], [3, 3, 3]])
def test_repeated_token_attention_equals_real_zero_tokens(copies):
    """Training with one zero T5 token whose attention logit is raised by log k == the pipeline's k real zero tokens
    (per row), through every joint block of a toy MMDiT; and gradients flow."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from imgalign.toy.models import build_sd3_transformer

    net = build_sd3_transformer(0, width=64, layers=3).eval()
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 32, 96, generator=g)
    pooled, t = torch.randn(3, 96, generator=g), torch.rand(3, generator=g) * 1000
    with torch.no_grad():
        real = torch.cat([net(hidden_states=x[i:i + 1], timestep=t[i:i + 1], pooled_projections=pooled[i:i + 1],
                              encoder_hidden_states=torch.cat([ehs[i:i + 1], torch.zeros(1, k, 96)], 1)).sample
                          for i, k in enumerate(copies)])
    build.use_repeated_token_attention(net, torch.tensor(copies, dtype=torch.float32))
    one = net(hidden_states=x, timestep=t, pooled_projections=pooled,
              encoder_hidden_states=torch.cat([ehs, torch.zeros(3, 1, 96)], 1)).sample
    torch.testing.assert_close(one, real, atol=2e-5, rtol=1e-4)
    one.square().mean().backward()
    assert all(p.grad is not None for p in net.transformer_blocks[0].attn.add_k_proj.parameters())
    # and with a count of 1 it is diffusers' own processor
    build.use_repeated_token_attention(net, torch.ones(3))
    with torch.no_grad():
        ones = net(hidden_states=x, timestep=t, pooled_projections=pooled,
                   encoder_hidden_states=torch.cat([ehs, torch.zeros(3, 1, 96)], 1)).sample
    net.set_attn_processor(JointAttnProcessor2_0())
    with torch.no_grad():
        plain = net(hidden_states=x, timestep=t, pooled_projections=pooled,
                    encoder_hidden_states=torch.cat([ehs, torch.zeros(3, 1, 96)], 1)).sample
    torch.testing.assert_close(ones, plain)


def test_identity_layers_make_sd3s_penultimate_hidden_state_the_last_trained_layer():
    """SD3's pipeline conditions on hidden_states[-2]: on the 2-layer toy CLIP that is layer 1's output; with one
    zero-residual layer appended it is layer 2's (what the toy SD conditions on, before the final norm), while the
    last hidden state and the pooled projection stay exactly those of the 2-layer tower."""
    from transformers import CLIPModel

    from imgalign._paths import TOY_ASSETS
    from imgalign.toy import models as M

    clip = CLIPModel.from_pretrained(str(TOY_ASSETS / "clip"))
    plain, deeper = M.text_tower(clip, projection=True), M.text_tower(clip, projection=True, identity_layers=1)
    assert deeper.config.num_hidden_layers == 3
    ids = M.tokenizer()(["a red circle left of two blue squares"], padding="max_length", max_length=32,
                        return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = plain(ids, output_hidden_states=True), deeper(ids, output_hidden_states=True)
    torch.testing.assert_close(b.hidden_states[-2], a.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(b.text_embeds, a.text_embeds, rtol=0, atol=0)
    assert not torch.equal(a.hidden_states[-2], b.hidden_states[-2])
