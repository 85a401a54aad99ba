"""Image-to-image and inpainting against diffusers' own StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (same seed, same scheduler), and every bad image, mask and strength."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_error, run_cli, sdexport_env
from sdexport.backends import load_engines
from sdexport.errors import ShapeError, UsageError
from sdexport.pipeline import Pipeline, make_scheduler
from sdexport.runtime import ExportDir
from test_pipeline import psnr


def noise_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth colour ramps plus noise: an image whose every region differs (a flat one would hide misplaced pixels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x / width, y / height, (x + y) / (width + height)], -1)
    pixels = (0.6 * ramp + 0.4 * rng.random((height, width, 3))) * 255
    return Image.fromarray(pixels.astype("uint8")).convert(mode)


def png_header_only(height: int, width: int) -> bytes:
    """A PNG's signature, header chunk (IHDR: 8-bit RGB of that size) and one data chunk of a few rows (173 bytes
    at 9000x9000): PIL opens it and reports its size; decoding it allocates every pixel (243 MB at 9000x9000)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(4 * (3 * width + 1)))))


def box_mask(height: int, width: int, mode: str = "L") -> Image.Image:
    mask = np.zeros((height, width), "uint8")
    mask[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = 255
    return Image.fromarray(mask).convert(mode)


def generators(seed):
    if isinstance(seed, list):
        return [torch.Generator("cpu").manual_seed(s) for s in seed]
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def img2img_ref(tiny_model):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_ref(inpaint_model):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpaint_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_pipes(export_fp32):
    export = ExportDir.open(export_fp32)
    return {b: Pipeline(load_engines(export, b, components=export.components_for(image=True)), export)
            for b in ("ort", "torch")}


@pytest.fixture(scope="module")
def inpaint_pipes(export_inpaint):
    export = ExportDir.open(export_inpaint)
    return {b: Pipeline(load_engines(export, b), export) for b in ("ort", "torch")}


# --- image-to-image --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,scheduler,strength,batch,seed", [
    ("ort", "euler", 0.6, 1, 3),
    ("ort", "euler-a", 0.75, 2, 4),  # ancestral: the generator keeps drawing every step
    ("ort", "dpm++2m", 0.5, 2, [11, 12]),  # a generator per image: one encoder draw each
    ("ort", "ddim", 1.0, 1, 5),
    ("torch", "pndm", 0.8, 1, 6),
])
def test_img2img_matches_diffusers(tiny_pipes, img2img_ref, export_fp32, backend, scheduler, strength, batch, seed):
    image = noise_image(128, 96)
    pipe = tiny_pipes[backend]
    ours = pipe("a cat on a sofa", negative_prompt="blurry", steps=4, guidance_scale=6.0, seed=seed,
                batch_size=batch, scheduler=scheduler, image=image, strength=strength)
    img2img_ref.scheduler = make_scheduler(scheduler, pipe.info.scheduler_config)
    theirs = img2img_ref("a cat on a sofa", negative_prompt="blurry", image=image, strength=strength,
                         num_inference_steps=4, guidance_scale=6.0, generator=generators(seed),
                         num_images_per_prompt=batch, output_type="np").images
    assert ours.mode == "image-to-image" and ours.images.shape == theirs.shape == (batch, 128, 96, 3)
    assert psnr(ours.images, theirs) >= 40.0
    assert ours.stage_summary()["vae_encoder_ms"] > 0


def test_img2img_image_and_strength_matter(tiny_pipes):
    """Neighbours of one request: another strength, another image (the tiny model's weights are random, so
    what the result should look like is the parity tests' business: here, that each input reaches it)."""
    pipe = tiny_pipes["ort"]
    image = noise_image(128, 128, seed=1)
    kw = dict(prompt="x", steps=10, guidance_scale=1.0, seed=0, scheduler="ddim")
    low = pipe(image=image, strength=0.1, **kw).images[0]
    assert psnr(low, pipe(image=image, strength=1.0, **kw).images[0]) < 35
    assert psnr(low, pipe(image=noise_image(128, 128, seed=2), strength=0.1, **kw).images[0]) < 35
    assert psnr(low, pipe(image=image, strength=0.1, **kw).images[0]) == float("inf")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "1", "CMYK"])
def test_img2img_takes_other_8bit_modes_as_diffusers_load_image_does(tiny_pipes, mode):
    """A grayscale, palette, binary or RGBA file is what diffusers' load_image turns into RGB; fed as it was, the
    VAE encoder got 1 or 4 channels (exit 4 naming the ONNX input)."""
    image = noise_image(64, 64, seed=5).convert(mode)
    kw = dict(prompt="x", steps=2, guidance_scale=1.0, seed=0, scheduler="ddim", strength=1.0)
    ours = tiny_pipes["ort"](image=image, **kw).images
    assert psnr(ours, tiny_pipes["ort"](image=image.convert("RGB"), **kw).images) == float("inf")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_img2img_refuses_16bit_and_float_images(tiny_pipes, mode):
    image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype("uint16")).convert(mode)
    with pytest.raises(UsageError, match=f"--image: a {mode.replace(';', '.')}"):
        tiny_pipes["ort"]("x", steps=2, image=image, strength=1.0)


def test_img2img_resizes_like_diffusers(tiny_pipes, img2img_ref):
    """--height/--width resize the image with Lanczos (VaeImageProcessor); the reference gets the image resized by PIL."""
    image = noise_image(90, 100, seed=4)
    pipe = tiny_pipes["ort"]
    ours = pipe("a boat", steps=3, guidance_scale=5.0, seed=2, scheduler="euler", image=image, strength=0.7,
                height=64, width=96).images
    img2img_ref.scheduler = make_scheduler("euler", pipe.info.scheduler_config)
    theirs = img2img_ref("a boat", image=image.resize((96, 64), Image.LANCZOS), strength=0.7, num_inference_steps=3,
                         guidance_scale=5.0, generator=generators(2), output_type="np").images
    assert ours.shape == (1, 64, 96, 3) and psnr(ours, theirs) >= 40.0


def test_img2img_size_the_export_cannot_take_is_refused(tiny_pipes):
    pipe = tiny_pipes["ort"]
    with pytest.raises(ShapeError, match=r"100x90 px.*96x88.*multiples of 16 in \[64, 256\].*--height/--width"):
        pipe("x", steps=2, image=noise_image(90, 100))
    with pytest.raises(ShapeError, match=r"multiples of 16 in \[64, 256\]"):
        pipe("x", steps=2, image=noise_image(320, 128))  # a multiple, but above the range
    # neighbours that fit: 64 (the smallest side) and a side that rounds down onto a multiple of 16 (135 -> 128)
    assert pipe("x", steps=2, image=noise_image(64, 135), strength=0.5).images.shape == (1, 64, 128, 3)


def test_img2img_side_given_is_taken_as_given_never_rounded(tiny_pipes):
    """A side the request names is checked as text-to-image checks it: --height 72 alone was rounded down to 64
    silently (while --height 72 --width 64, or text-to-image, refused it); the other side keeps the image's."""
    pipe = tiny_pipes["ort"]
    with pytest.raises(ShapeError, match="height 72 is not a multiple of 16"):
        pipe("x", steps=2, image=noise_image(64, 64), strength=0.5, height=72)
    with pytest.raises(ShapeError, match="width 72 is not a multiple of 16"):
        pipe("x", steps=2, image=noise_image(64, 64), strength=0.5, width=72)
    out = pipe("x", steps=2, image=noise_image(64, 135), strength=0.5, height=96)  # 135 -> 128: the image's side
    assert out.images.shape == (1, 96, 128, 3)


# The modules a first pipeline call imports while its "total" stage runs, in a fresh process (what infer is): the
# import time would be reported as pipeline time ("other"). An image request imported diffusers' models (about a
# second: infer's total 0.9-1.5 s against 50 ms for text to image), an LCM one diffusers' pipelines.
IMPORTS_WHILE_TIMED = """
import contextlib, json, sys
from PIL import Image
from sdexport import timing
from sdexport.backends import load_engines
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir

stage, seen = timing.StageClock.stage, []

@contextlib.contextmanager
def watched(self, name):
    before = set(sys.modules)
    with stage(self, name):
        yield
    if name == "total":
        seen.extend(sorted(set(sys.modules) - before))

timing.StageClock.stage = watched
export, image, mask = sys.argv[1], *[Image.open(p) if p != "-" else None for p in sys.argv[2:4]]
export = ExportDir.open(export)
pipe = Pipeline(load_engines(export, "ort", components=export.components_for(image=image is not None)), export)
pipe("x", steps=2, image=image, mask=mask)
print(json.dumps(seen))
"""


def imports_while_timed(export, image="-", mask="-") -> list[str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", IMPORTS_WHILE_TIMED, str(export), str(image), str(mask)],
                          capture_output=True, text=True, env=sdexport_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_first_image_request_times_no_import(export_fp32, export_inpaint, tmp_path):
    noise_image(64, 64).save(tmp_path / "in.png")
    box_mask(64, 64).save(tmp_path / "mask.png")
    assert imports_while_timed(export_fp32) == []  # text to image, the reference
    assert imports_while_timed(export_fp32, tmp_path / "in.png") == []
    assert imports_while_timed(export_inpaint, tmp_path / "in.png", tmp_path / "mask.png") == []


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_strength_outside_0_1_is_refused(tiny_pipes, strength):
    with pytest.raises(UsageError, match=r"must be in \(0, 1\]"):
        tiny_pipes["ort"]("x", steps=2, image=noise_image(64, 64), strength=strength)


def test_strength_that_leaves_no_step_is_refused(tiny_pipes):
    pipe = tiny_pipes["ort"]
    with pytest.raises(UsageError, match="leaves no denoising step"):
        pipe("x", steps=3, image=noise_image(64, 64), strength=0.3, scheduler="euler")  # int(0.9) = 0
    assert pipe("x", steps=3, image=noise_image(64, 64), strength=0.34, scheduler="euler").images.shape[0] == 1


# --- inpainting ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,scheduler,strength,batch,seed,size", [
    ("ort", "euler", 1.0, 1, 3, (96, 128)),  # strength 1: pure noise, the masked image still encoded
    ("ort", "euler-a", 0.75, 2, 4, (96, 128)),  # image latents + noise, ancestral steps
    ("ort", "dpm++2m", 1.0, 2, [1, 2], (96, 128)),
    ("ort", "ddim", 0.5, 1, 5, (128, 128)),  # the image and mask resized to the request's size
    ("torch", "pndm", 1.0, 1, 6, (96, 128)),
])
def test_inpainting_matches_diffusers(inpaint_pipes, inpaint_ref, backend, scheduler, strength, batch, seed, size):
    image, mask = noise_image(96, 128), box_mask(96, 128)
    pipe = inpaint_pipes[backend]
    ours = pipe("a red door", negative_prompt="dark", steps=4, guidance_scale=6.0, seed=seed, batch_size=batch,
                scheduler=scheduler, image=image, mask=mask, strength=strength, height=size[0], width=size[1])
    inpaint_ref.scheduler = make_scheduler(scheduler, pipe.info.scheduler_config)
    theirs = inpaint_ref("a red door", negative_prompt="dark", image=image, mask_image=mask, strength=strength,
                         num_inference_steps=4, guidance_scale=6.0, generator=generators(seed),
                         num_images_per_prompt=batch, height=size[0], width=size[1], output_type="np").images
    assert ours.mode == "inpainting" and ours.images.shape == theirs.shape == (batch, *size, 3)
    assert psnr(ours.images, theirs) >= 40.0


def test_mask_matters(inpaint_pipes):
    pipe = inpaint_pipes["ort"]
    image = noise_image(96, 128)
    kw = dict(prompt="x", steps=2, seed=0, image=image, height=96, width=128)
    a = pipe(mask=box_mask(96, 128), **kw).images
    b = pipe(mask=box_mask(96, 128).transpose(Image.FLIP_LEFT_RIGHT).rotate(90, expand=False), **kw).images
    assert psnr(a, b) < 40


def test_inpainting_model_needs_image_and_mask(inpaint_pipes):
    pipe = inpaint_pipes["ort"]
    with pytest.raises(UsageError, match="inpainting model.*--image and --mask"):
        pipe("x", steps=2)
    with pytest.raises(UsageError, match="give --mask"):
        pipe("x", steps=2, image=noise_image(96, 128))


def test_bad_masks_are_refused(inpaint_pipes, tiny_pipes):
    pipe = inpaint_pipes["ort"]
    image = noise_image(96, 128)
    with pytest.raises(UsageError, match=r"--mask is 128x64 px, --image 128x96 px"):
        pipe("x", steps=2, image=image, mask=box_mask(64, 128))
    with pytest.raises(UsageError, match="a RGBA image; a mask is grayscale"):
        pipe("x", steps=2, image=image, mask=box_mask(96, 128, mode="RGBA"))
    for mode in ("1", "RGB"):  # the neighbours diffusers takes: binary and grayscale saved as RGB
        assert pipe("x", steps=1, image=image, mask=box_mask(96, 128, mode=mode)).images.shape == (1, 128, 128, 3)
    with pytest.raises(UsageError, match="not an inpainting model"):
        tiny_pipes["ort"]("x", steps=2, image=image, mask=box_mask(96, 128))
    with pytest.raises(UsageError, match="--mask needs --image"):
        tiny_pipes["ort"]("x", steps=2, mask=box_mask(96, 128))
    with pytest.raises(UsageError, match="--strength applies to --image"):
        tiny_pipes["ort"]("x", steps=2, strength=0.5)


# --- the command line ------------------------------------------------------------------------------------

def diffusers_strength(pipeline: str) -> float:
    """The strength a diffusers pipeline uses when given none (its ``__call__`` default)."""
    import inspect

    import diffusers

    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters["strength"].default


def test_cli_img2img_and_inpainting(export_fp32, export_inpaint, tmp_path):
    noise_image(128, 96).save(tmp_path / "in.png")
    result = run_cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "a.png", "--steps", 3, "--image",
                     tmp_path / "in.png", "--strength", 0.7)
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["mode"] == "image-to-image" and meta["strength"] == 0.7 and meta["image"].endswith("in.png")
    assert Image.open(tmp_path / "a.png").size == (96, 128) and meta["timings_ms"]["vae_encoder_ms"] > 0
    assert meta["timings_ms"]["image_preprocess_ms"] > 0 and "(image preprocessing " in result.stderr
    noise_image(96, 128).save(tmp_path / "in2.png")
    box_mask(96, 128).save(tmp_path / "mask.png")
    result = run_cli("infer", export_inpaint, "--prompt", "x", "-o", tmp_path / "b.png", "--steps", 2, "--image",
                     tmp_path / "in2.png", "--mask", tmp_path / "mask.png")
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "b.json").read_text())
    # the sidecar records the strength that ran: without --strength, diffusers' default (it recorded null)
    assert meta["mode"] == "inpainting" and meta["mask"].endswith("mask.png")
    assert meta["strength"] == diffusers_strength("StableDiffusionInpaintPipeline")


def test_bench_times_the_encoder(export_fp32, tmp_path):
    noise_image(64, 64).save(tmp_path / "in.png")
    result = run_cli("bench", export_fp32, "--steps", 2, "--runs", 1, "--warmup", 0, "--no-eager", "--image",
                     tmp_path / "in.png", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    assert "VAE encode (image)" in result.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["mode"] == "image-to-image" and report["results"][0]["stages_ms"]["vae_encoder"] > 0


@pytest.mark.parametrize("mode", ["text-to-image", "image-to-image", "inpainting"])
def test_bench_rows_account_for_the_total(request, mode, tmp_path):
    """The table's stage rows and the loop overhead add up to "Pipeline total" but for what the pipeline spends
    elsewhere (tokenizing, drawing noise, post-processing): at most a quarter of it, text-to-image or not. An
    image request's preprocessing (a 2048 px image and mask resized to 64 px: about two thirds of the total
    here) is its own row; it was only in bench.json's outside_loop_and_engines_ms, which keeps counting it.
    Each row is a median over the runs, and medians of the parts need not add up to the median of the total:
    on a loaded machine (CI's 2 cores, two workers) text-to-image's rows once summed to 74% of it. Hence five
    runs and a band of 0.6-1.2: without the preprocessing row an image request's rows sum to about a third."""
    import re

    export = request.getfixturevalue("export_inpaint" if mode == "inpainting" else "export_fp32")
    noise_image(2048, 2048).save(tmp_path / "in.png")
    box_mask(2048, 2048).save(tmp_path / "mask.png")
    image = {"text-to-image": [], "image-to-image": ["--image", tmp_path / "in.png"],
             "inpainting": ["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png"]}[mode]
    result = run_cli("bench", export, "--steps", 2, "--runs", 5, "--warmup", 1, "--no-eager", "--height", 64,
                     "--width", 64, *image, "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    rows = dict(re.findall(r"^(\S.{0,21}?) +([0-9.]+) ms$", result.stdout, re.M))
    total = float(rows.pop("Pipeline total"))
    overhead = float(re.search(r"loop overhead ([0-9.]+) ms", result.stdout)[1])
    assert ("Image preprocessing" in rows) == bool(image), result.stdout
    accounted = sum(map(float, rows.values())) + overhead
    assert 0.6 * total <= accounted <= total * 1.2, result.stdout
    figures = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert figures["stages_ms"]["pipeline_total"] == pytest.approx(total, abs=0.005)
    if image:
        assert figures["outside_loop_and_engines_ms"] >= figures["stages_ms"]["image_preprocess"] > 0


def test_cli_bad_inputs_write_nothing(export_fp32, export_inpaint, tmp_path):
    noise_image(64, 64).save(tmp_path / "in.png")
    box_mask(64, 64).save(tmp_path / "mask.png")
    (tmp_path / "text.png").write_text("not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "trunc.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "trunc.png").read_bytes()[:40])
    (tmp_path / "big.png").write_bytes(png_header_only(8192, 8193))  # one column over 8192x8192
    Image.new("L", (8192, 8192)).save(tmp_path / "bound.png")  # the most any model's bound takes (67 MP, 64 KB)
    (tmp_path / "bomb.png").write_bytes(png_header_only(9000, 9000))  # 81 MP: under PIL's own bound
    out = tmp_path / "o.png"
    bound = "at most 67,108,864 (8192x8192) are read; downscale it first"
    cases = [
        ((export_fp32, "--image", tmp_path / "missing.png"), 2, "no such file"),
        # pixels beyond what the model can use, refused from the header (the bomb was decoded: 243 MB)
        ((export_fp32, "--image", tmp_path / "big.png"), 2, f"--image {tmp_path / 'big.png'}: 8193x8192 px is "
         f"67,117,056 pixels; {bound}"),
        ((export_fp32, "--image", tmp_path / "bomb.png"), 2, f"--image {tmp_path / 'bomb.png'}: 9000x9000 px is "
         f"81,000,000 pixels; {bound}"),
        ((export_inpaint, "--image", tmp_path / "bound.png", "--mask", tmp_path / "bomb.png"), 2,
         f"--mask {tmp_path / 'bomb.png'}: 9000x9000 px"),
        ((export_fp32, "--image", tmp_path / "text.png"), 2, "not an image"),
        ((export_fp32, "--image", tmp_path / "trunc.png"), 2, "not an image"),
        ((export_fp32, "--image", tmp_path / "in.png", "--mask", tmp_path / "text.png"), 2, "not an image"),
        ((export_fp32, "--image", tmp_path / "in.png", "--strength", 0), 2, "(0, 1]",
         f"Stable Diffusion 1.x/2.x image-to-image uses {diffusers_strength('StableDiffusionImg2ImgPipeline')}"),
        ((export_fp32, "--image", tmp_path / "in.png", "--strength", "nan"), 2, "(0, 1]"),
        ((export_inpaint, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--strength", 1.5), 2,
         "(0, 1]", f"Stable Diffusion 1.x/2.x inpainting uses {diffusers_strength('StableDiffusionInpaintPipeline')}"),
        ((export_fp32, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png"), 2, "not an inpainting model"),
        ((export_fp32, "--strength", 0.5), 2, "--strength applies to --image"),
        ((export_inpaint,), 2, "--image and --mask"),
        ((export_inpaint, "--image", tmp_path / "in.png"), 2, "give --mask"),
    ]
    for args, code, *needles in cases:
        result = run_cli("infer", *args, "--prompt", "x", "-o", out, "--steps", 2)
        assert_error(result, code, *needles)
        assert not out.exists() and not out.with_suffix(".json").exists()
    # bench reads --image by the same rule; at the bound an image is taken (and resized to the request's size)
    assert_error(run_cli("bench", export_fp32, "--image", tmp_path / "bomb.png", "--steps", 1, "--runs", 1,
                         "--warmup", 0, "--no-eager"), 2, f"--image {tmp_path / 'bomb.png'}: 9000x9000 px")
    result = run_cli("infer", export_fp32, "--image", tmp_path / "bound.png", "--height", 64, "--width", 64,
                     "--prompt", "x", "-o", out, "--steps", 2, "--strength", 0.5)
    assert result.exit_code == 0, result.stderr


def test_unet_channels_inpainting_accepted_others_refused(inpaint_model, tmp_path):
    """9 = 2 x 4 + 1 input channels is an inpainting UNet; the neighbours (8, 10) are refused (exit 3)."""
    from sdexport.errors import ModelError
    from sdexport.models import ModelInfo

    info = ModelInfo.open(inpaint_model)
    assert info.inpainting and info.latent_channels == 4 and info.unet_in_channels == 9
    for channels in (8, 10):
        copy = tmp_path / f"c{channels}"
        shutil.copytree(inpaint_model, copy)
        config = json.loads((copy / "unet" / "config.json").read_text())
        (copy / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": channels}))
        with pytest.raises(ModelError, match=f"VAE latent_channels 4 differs from UNet in_channels {channels}"):
            ModelInfo.open(copy)
