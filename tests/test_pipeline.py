"""The sampler loop against diffusers' own StableDiffusionPipeline (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdexport.backends import load_engines
from sdexport.errors import ShapeError, UsageError
from sdexport.pipeline import Pipeline, make_scheduler
from sdexport.runtime import ExportDir

SCHEDULERS = ["ddim", "euler", "euler-a", "dpm++2m", "unipc"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, scheduler, config, **kw):
    pipe.scheduler = make_scheduler(scheduler, config)
    return pipe(kw["prompt"], negative_prompt=kw.get("negative_prompt"), num_inference_steps=kw["steps"],
                guidance_scale=kw["guidance_scale"], generator=torch.Generator("cpu").manual_seed(kw["seed"]),
                height=kw["height"], width=kw["width"], num_images_per_prompt=kw["batch_size"],
                output_type="np").images


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_image_as_diffusers(export_fp32, reference, backend, scheduler):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, backend), export)
    kw = dict(prompt="a lighthouse on a cliff at dusk", negative_prompt="blurry", steps=3, guidance_scale=6.0,
              seed=1234, height=128, width=96, batch_size=2)
    ours = pipe(scheduler=scheduler, **kw).images
    theirs = diffusers_images(reference, scheduler, export.info.scheduler_config, **kw)
    assert ours.shape == theirs.shape == (2, 128, 96, 3)
    assert psnr(ours, theirs) >= 40.0


def test_seed_changes_image_and_guidance_off_matches(export_fp32, reference):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, "ort"), export)
    kw = dict(prompt="a red bicycle", steps=2, height=64, width=64, batch_size=1)
    a = pipe(seed=1, guidance_scale=1.0, scheduler="euler", **kw).images
    b = pipe(seed=2, guidance_scale=1.0, scheduler="euler", **kw).images
    assert psnr(a, b) < 40.0
    ref = diffusers_images(reference, "euler", export.info.scheduler_config, seed=1, guidance_scale=1.0, **kw)
    assert psnr(a, ref) >= 40.0


def test_other_model_v_prediction_matches_diffusers(export_other, other_model):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(other_model)
    ref.set_progress_bar_config(disable=True)
    export = ExportDir.open(export_other)
    pipe = Pipeline(load_engines(export_other, "ort"), export)
    kw = dict(prompt="a bowl of ramen", steps=3, guidance_scale=5.0, seed=7, height=112, width=64, batch_size=1)
    ours = pipe(**kw).images  # the model's own scheduler (DDIM, v-prediction, trailing)
    theirs = ref(kw["prompt"], num_inference_steps=3, guidance_scale=5.0, height=112, width=64,
                 generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    assert psnr(ours, theirs) >= 40.0


def test_requests_outside_the_export_are_refused(export_fp32):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, "ort"), export)
    with pytest.raises(UsageError, match="at least 1"):
        pipe("x", steps=0)
    with pytest.raises(UsageError, match="negative"):
        pipe("x", guidance_scale=-1)
    with pytest.raises(ShapeError, match="multiple of 16"):
        pipe("x", height=72, width=64)
    with pytest.raises(ShapeError, match=r"\[64, 256\]"):
        pipe("x", height=512, width=64)
    with pytest.raises(ShapeError, match=r"\[1, 4\]"):
        pipe("x", batch_size=5)
    with pytest.raises(UsageError, match="unknown scheduler"):
        pipe("x", scheduler="heun-ish")


def test_engine_checks_shapes_itself(export_fp32):
    engine = load_engines(export_fp32, "ort", components=["unet"])["unet"]
    feed = {"sample": torch.zeros(2, 4, 48, 16), "timestep": torch.zeros(2), "encoder_hidden_states": torch.zeros(2, 77, 32)}
    with pytest.raises(ShapeError, match=r"latent_height=48 is outside the exported range \[8, 32\]"):
        engine(feed)


def test_long_prompt_is_truncated_with_a_warning(export_fp32):
    warnings = []
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, "ort"), export, warn=warnings.append)
    result = pipe(" ".join(["a very detailed castle"] * 30), steps=1, height=64, width=64)
    assert result.truncated and "truncated" in warnings[0]


@pytest.mark.parametrize("scheduler", ["euler-a", "dpm++2m"])
def test_batch_of_seeds_and_prompts_equals_single_calls(export_fp32, reference, scheduler):
    """Image i of a call with per-image prompts, negatives and seeds is the one-image call with seed i
    (bit for bit on ONNX Runtime, whose CPU kernels compute each row alike at any batch size), and the
    batch is what diffusers makes from the same prompt list and list of generators. Euler ancestral draws
    noise every step, so its images also need each image's own generator at every step."""
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, "ort"), export)
    prompts, negatives, seeds = ["a cat", "a lighthouse at dusk", "a cat"], ["", "blurry", "fog"], [11, 12, 13]
    kw = dict(steps=3, guidance_scale=6.0, height=64, width=96, scheduler=scheduler)
    batch = pipe(prompts, negative_prompt=negatives, seed=seeds, batch_size=3, **kw).images
    for i in range(3):
        single = pipe(prompts[i], negative_prompt=negatives[i], seed=seeds[i], **kw).images
        assert np.array_equal(batch[i], single[0]), i
    assert psnr(batch[0], batch[2]) < 40.0  # same prompt, other seed: another image

    reference.scheduler = make_scheduler(scheduler, export.info.scheduler_config)
    theirs = reference(prompts, negative_prompt=negatives, num_inference_steps=3, guidance_scale=6.0, height=64,
                       width=96, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                       output_type="np").images
    assert psnr(batch, theirs) >= 40.0


def test_per_image_lists_must_match_the_batch(export_fp32):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export_fp32, "ort"), export)
    with pytest.raises(UsageError, match="seed: 2 values for a batch of 3"):
        pipe("x", seed=[1, 2], batch_size=3, steps=1, height=64, width=64)
    with pytest.raises(UsageError, match="prompt: 3 values for a batch of 1"):
        pipe(["a", "b", "c"], steps=1, height=64, width=64)
