"""SDXL image-to-image (base and refiner) and inpainting against diffusers' StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline (same seed, same scheduler); base -> refiner in two commands against diffusers'
two pipelines; the refiner's aesthetic-score flags; SDXL's own strength defaults; bad input through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_error, run_cli
from sdexport.backends import load_engines
from sdexport.pipeline import Pipeline, make_scheduler
from sdexport.runtime import ExportDir
from test_img2img import box_mask, diffusers_strength, generators, noise_image
from test_pipeline import psnr


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipes(export_dir, backends=("ort", "torch")):
    export = ExportDir.open(export_dir)
    return {b: Pipeline(load_engines(export, b, components=export.components_for(image=True)), export)
            for b in backends}


@pytest.fixture(scope="module")
def sdxl_pipes(export_sdxl):
    return _pipes(export_sdxl)


@pytest.fixture(scope="module")
def refiner_pipes(export_refiner):
    return _pipes(export_refiner)


@pytest.fixture(scope="module")
def sdxl_img2img_ref(sdxl_tiny_model):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_tiny_model, add_watermarker=False))


@pytest.fixture(scope="module")
def refiner_ref(refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner, add_watermarker=False))


def _both(pipe, ref, *, image, strength, steps, seed, batch=1, scheduler=None, mask=None, **kw):
    """Our image and diffusers' for one request (strength None: each pipeline's own default)."""
    common = dict(negative_prompt="blurry", guidance_scale=6.0)
    ours = pipe("a cat on a sofa", steps=steps, seed=seed, batch_size=batch, scheduler=scheduler, image=image,
                mask=mask, strength=strength, **common, **kw)
    ref.scheduler = make_scheduler(scheduler, pipe.info.scheduler_config)  # None: the model's own
    extra = {"strength": strength} if strength is not None else {}
    if mask is not None:
        extra.update(mask_image=mask)
    theirs = ref("a cat on a sofa", image=image, num_inference_steps=steps, generator=generators(seed),
                 num_images_per_prompt=batch, output_type="np", **common, **extra, **kw).images
    return ours, theirs


# --- image-to-image on SDXL base ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,scheduler,strength,steps,batch,seed,options", [
    ("ort", "euler", 0.6, 4, 1, 3, {}),
    ("ort", "euler-a", 0.75, 4, 2, 4, {}),  # ancestral: the generator keeps drawing every step
    ("ort", "dpm++2m", 0.5, 4, 2, [11, 12], {}),  # a generator per image: one encoder draw each
    ("ort", "ddim", None, 7, 1, 5, {}),  # SDXL's default strength 0.3: int(7 x 0.3) = 2 steps
    ("ort", "unipc", 1.0, 3, 1, 6, dict(original_size=(256, 192), crops_coords_top_left=(16, 8))),
    ("torch", "euler", 0.8, 3, 1, 7, {}),
])
def test_sdxl_img2img_matches_diffusers(sdxl_pipes, sdxl_img2img_ref, backend, scheduler, strength, steps, batch,
                                        seed, options):
    image = noise_image(128, 96)
    ours, theirs = _both(sdxl_pipes[backend], sdxl_img2img_ref, image=image, strength=strength, steps=steps,
                         seed=seed, batch=batch, scheduler=scheduler, **options)
    assert ours.mode == "image-to-image" and ours.images.shape == theirs.shape == (batch, 128, 96, 3)
    assert psnr(ours.images, theirs) >= 40.0
    assert ours.steps == steps and len(ours.timings_ms["unet"]) == int(steps * (strength or 0.3))


def test_sdxl_default_strength_is_diffusers(sdxl_pipes):
    """The neighbour of the default: 0.3 (StableDiffusionXLImg2ImgPipeline's), not SD's 0.8."""
    pipe = sdxl_pipes["ort"]
    kw = dict(prompt="x", steps=10, seed=1, image=noise_image(64, 64), scheduler="euler")
    default = pipe(**kw).images
    np.testing.assert_array_equal(default, pipe(strength=0.3, **kw).images)
    assert psnr(default, pipe(strength=0.8, **kw).images) < 40


# --- the refiner ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,scheduler,strength,steps,batch,seed,options", [
    ("ort", None, None, 7, 1, 3, {}),  # the model's scheduler, the default strength and aesthetic scores
    ("ort", "euler-a", 0.75, 4, 2, 4, dict(aesthetic_score=7.5, negative_aesthetic_score=1.0)),
    ("torch", "dpm++2m", 0.5, 4, 1, 5, dict(aesthetic_score=3.0, original_size=(512, 512))),
])
def test_refiner_matches_diffusers(refiner_pipes, refiner_ref, backend, scheduler, strength, steps, batch, seed,
                                   options):
    image = noise_image(96, 80, seed=2)
    ours, theirs = _both(refiner_pipes[backend], refiner_ref, image=image, strength=strength, steps=steps, seed=seed,
                         batch=batch, scheduler=scheduler, **options)
    assert ours.images.shape == theirs.shape == (batch, 96, 80, 3)
    assert psnr(ours.images, theirs) >= 40.0


def test_aesthetic_scores_reach_the_image(refiner_pipes):
    pipe = refiner_pipes["ort"]
    kw = dict(prompt="x", steps=4, strength=1.0, seed=0, image=noise_image(96, 80), scheduler="euler")
    default = pipe(**kw).images
    np.testing.assert_array_equal(default, pipe(aesthetic_score=6.0, negative_aesthetic_score=2.5, **kw).images)
    assert psnr(default, pipe(aesthetic_score=9.0, **kw).images) < 60
    assert psnr(default, pipe(negative_aesthetic_score=0.0, **kw).images) < 60


def test_base_then_refiner_in_two_commands(export_sdxl, export_refiner, sdxl_tiny_model, refiner, refiner_ref,
                                           tmp_path):
    """The README's two commands: `infer` on the base export writes a PNG, `infer` on the refiner export
    refines it (--aesthetic-score as a flag); against diffusers' base pipeline (PIL output) fed to its refiner."""
    from diffusers import StableDiffusionXLPipeline

    result = run_cli("infer", export_sdxl, "--prompt", "a red fox in snow", "-o", tmp_path / "base.png", "--steps", 3,
                     "--seed", 11, "--height", 96, "--width", 64)
    assert result.exit_code == 0, result.stderr
    result = run_cli("infer", export_refiner, "--prompt", "a red fox in snow", "-o", tmp_path / "refined.png",
                     "--image", tmp_path / "base.png", "--steps", 4, "--strength", 0.5, "--seed", 12,
                     "--aesthetic-score", 7.0, "--negative-aesthetic-score", 2.0)
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "refined.json").read_text())
    assert meta["mode"] == "image-to-image" and meta["options"] == {"aesthetic_score": 7.0,
                                                                    "negative_aesthetic_score": 2.0}
    base = _quiet(StableDiffusionXLPipeline.from_pretrained(sdxl_tiny_model, add_watermarker=False))
    theirs_base = base("a red fox in snow", num_inference_steps=3, height=96, width=64,
                       generator=torch.Generator("cpu").manual_seed(11)).images[0]
    ours_base = Image.open(tmp_path / "base.png")
    assert psnr(np.asarray(ours_base) / 255, np.asarray(theirs_base) / 255) >= 40.0
    refiner_ref.scheduler = make_scheduler(None, ExportDir.open(export_refiner).info.scheduler_config)
    theirs = refiner_ref("a red fox in snow", image=theirs_base, num_inference_steps=4, strength=0.5,
                         aesthetic_score=7.0, negative_aesthetic_score=2.0,
                         generator=torch.Generator("cpu").manual_seed(12), output_type="np").images
    ours = np.asarray(Image.open(tmp_path / "refined.png"))[None] / 255
    assert ours.shape == theirs.shape == (1, 96, 64, 3)
    assert psnr(ours, theirs) >= 40.0


# --- SDXL inpainting ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_inpaint_model(sdxl_tiny_model, tmp_path_factory):
    """An SDXL inpainting model (UNet with 9 input channels) written by diffusers' StableDiffusionXLInpaintPipeline
    from the sdxl-tiny components."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    config = json.loads((sdxl_tiny_model / "unet" / "config.json").read_text())
    torch.manual_seed(8)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_tiny_model, unet=unet, add_watermarker=False)
    out = tmp_path_factory.mktemp("models") / "sdxl-inpaint"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def export_sdxl_inpaint(sdxl_inpaint_model, tmp_path_factory):
    from sdexport.export import export

    out = tmp_path_factory.mktemp("exports") / "sdxl-inpaint"
    export(str(sdxl_inpaint_model), out, max_images=2)
    return out


@pytest.mark.parametrize("backend,scheduler,strength,batch,seed", [
    ("ort", "euler", None, 2, 3),  # SDXL's default 0.9999: image latents + noise, one step fewer
    ("ort", "dpm++2m", 1.0, 2, [1, 2]),  # pure noise; the masked image still conditions every step
    ("torch", "euler-a", 0.6, 1, 4),
])
def test_sdxl_inpainting_matches_diffusers(export_sdxl_inpaint, sdxl_inpaint_model, backend, scheduler, strength,
                                           batch, seed):
    from diffusers import StableDiffusionXLInpaintPipeline

    (pipe,) = _pipes(export_sdxl_inpaint, (backend,)).values()
    assert pipe.info.inpainting and pipe.info.unet_in_channels == 9
    ref = _quiet(StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_inpaint_model, add_watermarker=False))
    image, mask = noise_image(96, 128), box_mask(96, 128)
    ours, theirs = _both(pipe, ref, image=image, mask=mask, strength=strength, steps=4, seed=seed, batch=batch,
                         scheduler=scheduler, height=96, width=128)
    assert ours.mode == "inpainting" and ours.images.shape == theirs.shape == (batch, 96, 128, 3)
    assert psnr(ours.images, theirs) >= 40.0


# --- bad input ---------------------------------------------------------------------------------------------

def test_sdxl_image_errors_write_nothing(export_sdxl, export_refiner, tmp_path):
    noise_image(96, 64).save(tmp_path / "in.png")
    noise_image(256, 64).save(tmp_path / "big.png")
    box_mask(96, 64).save(tmp_path / "mask.png")
    out = tmp_path / "o.png"
    image = ("--image", tmp_path / "in.png")
    cases = [
        ((export_sdxl, *image, "--strength", 1.5), 2, "(0, 1]",
         f"Stable Diffusion XL image-to-image uses {diffusers_strength('StableDiffusionXLImg2ImgPipeline')}"),
        ((export_sdxl, *image, "--steps", 3), 2, "leaves no denoising step"),  # default 0.3: int(0.9) = 0
        ((export_sdxl, *image, "--mask", tmp_path / "mask.png"), 2, "not an inpainting model"),
        ((export_sdxl, "--image", tmp_path / "big.png"), 4, "multiples of 32 in [64, 192]"),
        ((export_sdxl, *image, "--aesthetic-score", 6), 2, "--aesthetic-score: only for SDXL refiners"),
        ((export_refiner, *image, "--aesthetic-score", 11), 2, "--aesthetic-score 11.0", "[0.0, 10.0]"),
        ((export_refiner, *image, "--target-size", 64, 64), 2, "--target-size: only for SDXL base"),
        ((export_refiner,), 3, "SDXL refiner", "give it --image"),
    ]
    for args, code, *needles in cases:
        result = run_cli("infer", *args, "--prompt", "x", "-o", out, *(() if "--steps" in args else ("--steps", 4)))
        assert_error(result, code, *needles)
        assert not out.exists() and not out.with_suffix(".json").exists()
    result = run_cli("infer", export_refiner, *image, "--prompt", "x", "-o", out, "--steps", 4)  # the neighbour
    assert result.exit_code == 0, result.stderr
