"""The export loads in Hugging Face Optimum's ORTStableDiffusionPipeline (SD) and ORTStableDiffusionXLPipeline
(SDXL) and gives our image.

Optimum runs in its own environment (tests/optimum/requirements.txt; ``make optimum-env``),
named by $SDEXPORT_OPTIMUM_PYTHON or found at .venv-optimum/bin/python. In CI it must exist:
the test fails rather than skips when CI=true.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sdexport.backends import load_engines
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir

HERE = Path(__file__).parent


def optimum_python() -> str | None:
    candidate = os.environ.get("SDEXPORT_OPTIMUM_PYTHON") or str(HERE.parent / ".venv-optimum" / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


@pytest.fixture(scope="module")
def export_sdxl_by_diffusers(tmp_path_factory) -> Path:
    """An SDXL written by StableDiffusionXLPipeline.save_pretrained alone: under transformers 5 its tokenizer
    folders hold tokenizer.json only, which Optimum's transformers 4 cannot read."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from conftest import _export, small_sdxl_text_encoders, small_sdxl_unet, small_vae
    from sdexport.models import build_tokenizer

    torch.manual_seed(3)
    te, te2 = small_sdxl_text_encoders()
    model = tmp_path_factory.mktemp("models") / "sdxl-by-diffusers"
    StableDiffusionXLPipeline(
        vae=small_vae(True), text_encoder=te, text_encoder_2=te2, tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(pad_token="!"), unet=small_sdxl_unet(64, 16, 6),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        add_watermarker=False).save_pretrained(model)
    return _export(model, tmp_path_factory.mktemp("exports") / "sdxl-by-diffusers", max_images=2, max_size=160)


@pytest.mark.parametrize("fixture, pipeline, guidance", [
    ("export_fp32", "ORTStableDiffusionPipeline", 7.5),
    ("export_fp16", "ORTStableDiffusionPipeline", 7.5),
    ("export_sdxl", "ORTStableDiffusionXLPipeline", 5.0),  # two encoders, text_embeds, time_ids, hidden states
    ("export_sdxl_by_diffusers", "ORTStableDiffusionXLPipeline", 5.0),  # tokenizers as transformers 5 writes them
])
def test_optimum_loads_export_and_matches_infer(fixture, pipeline, guidance, request, tmp_path):
    python = optimum_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("the Optimum environment is missing in CI (make optimum-env)")
        pytest.skip("no Optimum environment (make optimum-env)")
    export_dir = request.getfixturevalue(fixture)
    out = tmp_path / "optimum.npy"
    args = ["a cabin in a snowy forest", "11", "3", "96", "128", "EulerDiscreteScheduler", pipeline, str(guidance)]
    proc = subprocess.run([python, str(HERE / "optimum" / "generate.py"), str(export_dir), str(out), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"optimum {pipeline}" in proc.stdout
    theirs = np.load(out)
    export = ExportDir.open(export_dir)
    ours = Pipeline(load_engines(export_dir, "ort"), export)(
        args[0], seed=11, steps=3, height=96, width=128, guidance_scale=guidance, scheduler="euler").images
    assert theirs.shape == ours.shape == (1, 96, 128, 3)
    mse = float(np.mean((theirs.astype(np.float64) - ours) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 40.0
