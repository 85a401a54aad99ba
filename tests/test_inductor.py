"""AOTInductor engines (sdexport build --backend inductor): compiled on the CPU here (the CUDA path is the
same code with device cuda; measured on the GPU machine), checked against PyTorch and ONNX Runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import assert_error, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inductor_export(export_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("inductor") / "e"
    shutil.copytree(export_fp32, out)
    result = run_cli("build", out, "--backend", "inductor", "--device", "cpu", "--static", "64x64",
                     "--components", "unet", "--precision", "fp32")
    assert result.exit_code == 0, result.stderr
    result = run_cli("build", out, "--backend", "inductor", "--device", "cpu", "--static", "64x64",
                     "--components", "vae_decoder", "--precision", "fp32", "--max-batch", 2)
    assert result.exit_code == 0, result.stderr
    return out


def test_dynamic_batch_package(inductor_export):
    entry = json.loads((inductor_export / "manifest.json").read_text())["inductor"]["vae_decoder"]
    assert entry["file"] == "inductor/vae_decoder.cpu.b1-2-64x64.pt2" and entry["batch_range"] == [1, 2]
    from sdexport.backends.inductor import InductorEngine
    from sdexport.backends.torch import TorchEngine
    from sdexport.errors import ShapeError
    from sdexport.runtime import ExportDir

    export = ExportDir.open(inductor_export)
    engine = InductorEngine(export, "vae_decoder", "cpu")
    reference = TorchEngine.load_all(export, ["vae_decoder"])["vae_decoder"]
    for batch in (1, 2):
        feed = engine.spec.sample_inputs({"batch": batch, "latent_height": 8, "latent_width": 8}, seed=batch)
        got, want = engine(feed)["sample"], reference(feed)["sample"]
        assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 1e-4
    with pytest.raises(ShapeError, match="takes 1 to 2 images per call; this request is 3 images per call"):
        engine(engine.spec.sample_inputs({"batch": 3, "latent_height": 8, "latent_width": 8}))


def test_package_in_manifest_and_up_to_date(inductor_export):
    entry = json.loads((inductor_export / "manifest.json").read_text())["inductor"]["unet"]
    assert entry["file"] == "inductor/unet.cpu.b1-64x64.pt2" and entry["device"] == "cpu"
    assert entry["dims"] == {"batch": 2, "latent_height": 8, "latent_width": 8}  # one image with guidance
    assert entry["changes"] == ["fused_qkv", "channels_last"]
    before = (inductor_export / entry["file"]).read_bytes()
    result = run_cli("build", inductor_export, "--backend", "inductor", "--device", "cpu", "--static", "64x64",
                     "--components", "unet", "--precision", "fp32")
    assert result.exit_code == 0 and "up to date" in result.stderr
    assert (inductor_export / entry["file"]).read_bytes() == before


def test_build_says_what_it_built_and_what_the_export_holds(inductor_export):
    """`build --backend inductor --components unet` on an export with packages for other components printed
    "1 Inductor engine(s)", the count of the components it was asked for, not of the packages the export holds.
    The line now has build's form for every backend: built, up to date, and the packages the export holds."""
    held = sorted(json.loads((inductor_export / "manifest.json").read_text())["inductor"])
    assert held == ["unet", "vae_decoder"]  # the fixture's two builds, one component each
    result = run_cli("build", inductor_export, "--backend", "inductor", "--device", "cpu", "--static", "64x64",
                     "--components", "unet", "--precision", "fp32")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (f"{inductor_export}/manifest.json: 0 built, 1 up to date (fp32, cpu); the "
                                     "export holds 2 Inductor package(s): unet, vae_decoder")


def test_default_precision_is_the_devices(inductor_export, monkeypatch):
    """`sdexport build E --backend inductor --static HxW`, as the README writes it, failed on a CPU-only host
    ("--precision fp16: Inductor engines for the CPU are fp32", exit 2): the default was fp16 whatever the
    device. It is now the device's: fp32 on the CPU (here the fixture's fp32 package, up to date: the same
    key), fp16 on cuda; an explicit --precision fp16 for the CPU is still refused (test_bad_requests).
    The host is made CPU-only for the test: on a GPU host, no --device and auto mean cuda, and the first run of
    this suite on one (session 16) built a CUDA package over the fixture's, failing the two tests after it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ([], ["--device", "cpu"], ["--device", "auto"]):  # auto: the CPU on a host with no GPU
        result = run_cli("build", inductor_export, "--backend", "inductor", "--static", "64x64",
                         "--components", "unet", *device)
        assert result.exit_code == 0, result.stderr
        assert "unet: up to date" in result.stderr and "(fp32, cpu)" in result.stdout
    assert json.loads((inductor_export / "manifest.json").read_text())["inductor"]["unet"]["precision"] == "fp32"
    from sdexport.inductor import default_precision

    assert (default_precision("cpu"), default_precision("cuda")) == ("fp32", "fp16")
    assert "fp16 on cuda, fp32 on cpu" in " ".join(run_cli("build", "--help").stdout.split())


def test_validate_and_same_image_as_onnx_runtime(inductor_export, tmp_path):
    result = run_cli("validate", inductor_export, "--backend", "inductor", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    report = json.loads((inductor_export / "validation.json").read_text())
    assert report["passed"] and [r["component"] for r in report["results"]] == ["unet", "vae_decoder", "vae_decoder"]
    assert report["results"][0]["outputs"]["out_sample"]["rel_l2_err"] < 1e-4
    images = {}
    for backend in ("inductor", "ort"):
        out = tmp_path / f"{backend}.png"
        result = run_cli("infer", inductor_export, "--backend", backend, "--prompt", "a kite", "--height", 64,
                         "--width", 64, "--steps", 2, "--seed", 3, "-o", out, "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        from PIL import Image

        images[backend] = np.asarray(Image.open(out)).astype(np.float64)
    mse = np.mean((images["inductor"] - images["ort"]) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 40


def test_bad_requests(inductor_export, tmp_path):
    assert_error(run_cli("build", inductor_export, "--backend", "inductor", "--device", "cpu"), 2, "--static")
    # the CPU compiles fp32 only: an fp16 asked for is refused (the default is fp32 there)
    assert_error(run_cli("build", inductor_export, "--backend", "inductor", "--device", "cpu", "--static", "64x64",
                         "--precision", "fp16"), 2, "--precision fp16: Inductor engines for the CPU are fp32",
                 only_line=True)
    result = run_cli("infer", inductor_export, "--backend", "inductor", "--prompt", "p", "--height", 128,
                     "--width", 128, "--steps", 1, "-o", tmp_path / "x.png", "--device", "cpu")
    # in pixels, as the request was made (it spoke latent dims: {'latent_height': 8, ...}), with the way out
    assert_error(result, 4, "unet: the Inductor package inductor/unet.cpu.b1-64x64.pt2 was built for 64x64 images "
                 "(height x width, pixels); this request is 128x128:",
                 f"sdexport build {inductor_export} --backend inductor --static 128x128", "--backend ort")
    assert "latent" not in result.stderr
    assert not (tmp_path / "x.png").exists()
    # Another batch, in images per call on both sides: the package (1 image, 2 rows under classifier-free guidance)
    # was compared with the request's rows ("this request is 6 rows per call" for --batch-size 3). Guidance is on
    # above a scale of 1 (diffusers' rule): 3 images are 6 UNet rows with it, 3 rows without it (1 image without it
    # runs: its row is padded to the package's 2, test_fewer_rows_than_the_package_are_padded).
    for images, scale, request in ((3, 7.5, "3 images per call (6 rows)"),
                                   (3, 1.0, "3 images per call without classifier-free guidance (3 rows)")):
        result = run_cli("infer", inductor_export, "--backend", "inductor", "--prompt", "p", "--height", 64,
                         "--width", 64, "--steps", 1, "--batch-size", images, "--guidance-scale", scale,
                         "-o", tmp_path / "x.png", "--device", "cpu")
        assert_error(result, 4, "unet: the Inductor package inductor/unet.cpu.b1-64x64.pt2 takes 1 image per call "
                     f"with classifier-free guidance (2 rows); this request is {request}: build packages for it with "
                     f"'sdexport build {inductor_export} --backend inductor --static 64x64 "
                     "[--batch N | --max-batch N]'",
                     "--backend ort")
        assert "rows per call" not in result.stderr and "row per call" not in result.stderr
        # without guidance the rows are the images (builds compile with it): the message says how to turn it on
        assert ("a guidance scale above 1" in result.stderr) == (scale <= 1), result.stderr
        assert not (tmp_path / "x.png").exists()
    # the VAE decoder's rows are images, with or without guidance: the --max-batch 2 package's range and the
    # request in images only
    from sdexport.backends.base import serving
    from sdexport.backends.inductor import InductorEngine
    from sdexport.components import Geometry
    from sdexport.errors import ShapeError
    from sdexport.runtime import ExportDir

    engine = InductorEngine(ExportDir.open(inductor_export), "vae_decoder", "cpu")
    feed = engine.spec.sample_inputs({"batch": 3, "latent_height": 8, "latent_width": 8})
    for guidance in (True, False):
        with serving(Geometry(3, 64, 64, guidance=guidance)), pytest.raises(ShapeError) as info:
            engine(feed)
        assert ("vae_decoder: the Inductor package inductor/vae_decoder.cpu.b1-2-64x64.pt2 takes 1 to 2 images per "
                "call; this request is 3 images per call: build") in str(info.value)
        assert "row" not in str(info.value) and "guidance" not in str(info.value)


def test_fewer_rows_than_the_package_are_padded(inductor_export, export_sdxl, tmp_path):
    """A call with fewer rows than the package was compiled for is padded up to them (the last row repeated) and
    the caller's rows kept, as the TensorRT engine's static profiles do (Engine.fit_static_batch). Before,
    `sdexport build E --backend inductor --static 128x128` then `infer E --backend inductor --prompt P` on any
    SDXL export was exit 4: with no negative prompt SDXL zeroes the negative context (force_zeros_for_empty_prompt)
    and runs its text encoders on the prompts alone, 1 row for a package compiled for 2. Also: an SD 1.x image
    without guidance (1 UNet row) on a package compiled with it. Reference: the same request on ONNX Runtime."""
    from PIL import Image

    def same_image(export, *request):
        images = []
        for backend in ("inductor", "ort"):
            out = tmp_path / f"{backend}.png"
            result = run_cli("infer", export, "--backend", backend, *request, "--steps", 2, "--seed", 5, "-o", out,
                             "--device", "cpu")
            assert result.exit_code == 0, result.stderr
            images.append(np.asarray(Image.open(out)).astype(np.float64))
            out.unlink()
        mse = np.mean((images[0] - images[1]) ** 2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 40, mse

    same_image(inductor_export, "--prompt", "a kite", "--height", 64, "--width", 64, "--guidance-scale", 1.0)
    sdxl = tmp_path / "sdxl"
    shutil.copytree(export_sdxl, sdxl)
    result = run_cli("build", sdxl, "--backend", "inductor", "--device", "cpu", "--static", "128x128",
                     "--components", "text_encoder,text_encoder_2")
    assert result.exit_code == 0, result.stderr
    for negative in ([], ["--negative-prompt", "blurry"]):  # 1 row (zeroed negatives), then the package's 2
        same_image(sdxl, "--prompt", "a kite", "--height", 128, "--width", 128, *negative)
    # the engine itself: one row alone is the same as that row of a full call
    from sdexport.backends.inductor import InductorEngine
    from sdexport.runtime import ExportDir

    engine = InductorEngine(ExportDir.open(sdxl), "text_encoder_2", "cpu")
    full = engine.spec.sample_inputs({"batch": 2}, seed=1)
    both = {k: v.clone() for k, v in engine(full).items()}
    one = engine({k: v[1:] for k, v in full.items()})
    for name in engine.spec.output_names:
        if both[name].shape[0] == 2:
            assert one[name].shape[0] == 1
            np.testing.assert_allclose(one[name].numpy(), both[name][1:].numpy(), rtol=1e-5, atol=1e-5)


def test_the_batch_options_say_what_they_build(export_fp32):
    """`--static HxW --batch N` (one batch size) or `--static HxW --max-batch N` (any of 1..N), as the README's
    "Which to build" says: the help described --max-batch as a TensorRT profile bound only, the error without
    --static named --batch alone, and `--max-batch 1` was told to "leave out --batch", which it had not given."""
    import re

    base = ("build", export_fp32, "--backend", "inductor", "--device", "cpu", "--precision", "fp32")
    assert_error(run_cli(*base), 2, "--static HxW", "--batch N", "--max-batch N")
    result = run_cli(*base, "--static", "64x64", "--max-batch", 1)
    assert_error(result, 2, "--max-batch 1", "N >= 2", "--batch 1 is the default")
    assert "leave out --batch" not in result.stderr
    assert_error(run_cli(*base, "--static", "64x64", "--batch", 2, "--max-batch", 4), 2,
                 "--batch 2 and --max-batch 4: give one")
    assert_error(run_cli(*base[:-2], "--static", "64x64", "--precision", "int8"), 2, "fp16 or fp32")
    entries = re.split(r"\n  (?=-)", run_cli("build", "--help").stdout)  # one per option, wrapped lines and all
    options = {e.split()[0]: " ".join(e.split()[1:]) for e in entries[1:]}
    assert "inductor" in options["--max-batch"] and "1..N" in options["--max-batch"], options["--max-batch"]
    assert "Inductor package" in options["--batch"], options["--batch"]
    assert "inductor: required" in options["--static"], options["--static"]


def test_foreign_packages_are_refused(inductor_export, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(inductor_export, out)
    data = json.loads((out / "manifest.json").read_text())
    data["inductor"]["unet"]["torch"] = "1.0.0"
    (out / "manifest.json").write_text(json.dumps(data))
    result = run_cli("infer", out, "--backend", "inductor", "--prompt", "p", "--height", 64, "--width", 64,
                     "--steps", 1, "-o", tmp_path / "x.png")
    assert_error(result, 5, "torch 1.0.0")
    data["inductor"]["unet"].update(torch=__import__("torch").__version__, device="cuda", compute_capability="9.0")
    (out / "manifest.json").write_text(json.dumps(data))
    result = run_cli("infer", out, "--backend", "inductor", "--prompt", "p", "--height", 64, "--width", 64,
                     "--steps", 1, "-o", tmp_path / "x.png", "--device", "cpu")
    assert_error(result, 8, "compiled for cuda")


def test_packages_follow_the_exports_loras(inductor_export, tiny_model, tmp_path):
    """Packages are compiled with the export's fused LoRAs: a re-export with another LoRA left them in the
    manifest, and infer --backend inductor ran the old weights with exit 0. Now it is refused without --force
    (it would drop them) and drops them with it."""
    from test_lora import _peft_lora

    from sdexport.errors import IntegrityError
    from sdexport.inductor import check_package
    from sdexport.runtime import ExportDir

    out = shutil.copytree(inductor_export, tmp_path / "e")
    data = json.loads((out / "manifest.json").read_text())
    data["model"]["loras"] = [{"file": "/x.safetensors", "sha256": "0" * 64, "scale": 1.0}]  # as if re-exported
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="other fused LoRAs"):
        check_package(ExportDir.open(out), "unet", "cpu")
    check_package(ExportDir.open(out), "vae_decoder", "cpu")  # a LoRA never changes the VAE
    shutil.copy(inductor_export / "manifest.json", out / "manifest.json")
    lora = _peft_lora(tiny_model, tmp_path / "l.safetensors", 1, ["to_q"])
    # a re-export with another LoRA would drop the UNet's package: refused without --force, as with TensorRT
    # engines; the VAE's is not made from anything a LoRA changes, so it would stay and is not named
    result = run_cli("export", tiny_model, "-o", out, "--lora", lora)
    assert_error(result, 2, "(inductor/unet would stay")
    assert json.loads((out / "manifest.json").read_text())["inductor"]
    result = run_cli("export", tiny_model, "-o", out, "--lora", lora, "--force")
    assert result.exit_code == 0, result.stderr
    assert not json.loads((out / "manifest.json").read_text()).get("inductor")
    assert not list(out.glob("inductor/*.pt2"))
    assert_error(run_cli("infer", out, "--backend", "inductor", "--prompt", "x", "--height", 64, "--width", 64,
                         "--steps", 1, "-o", tmp_path / "x.png"), 5, "no Inductor engine")


def test_packages_are_not_dropped_by_another_opset_without_force(inductor_export, tiny_model, tmp_path):
    """A re-export with only another --opset rewrites every component: it dropped the packages compiled from
    them with exit 0, unasked, while another range or LoRA set was refused over them. Now it is refused the
    same way, naming each package and --force and changing nothing; --force drops them, files and entries."""
    out = shutil.copytree(inductor_export, tmp_path / "e")
    before = json.loads((out / "manifest.json").read_text())
    files = sorted(p.name for p in out.glob("inductor/*.pt2"))
    assert len(files) == 2
    result = run_cli("export", tiny_model, "-o", out, "--opset", "18")
    assert_error(result, 2, "opset 17 -> 18", "inductor/unet", "inductor/vae_decoder", "--force", only_line=True)
    assert json.loads((out / "manifest.json").read_text()) == before
    assert sorted(p.name for p in out.glob("inductor/*.pt2")) == files
    result = run_cli("export", tiny_model, "-o", out, "--opset", "18", "--force")
    assert result.exit_code == 0, result.stderr
    assert not json.loads((out / "manifest.json").read_text()).get("inductor")
    assert not (out / "inductor").exists()
