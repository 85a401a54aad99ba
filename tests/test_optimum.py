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


@pytest.mark.parametrize("fixture, pipeline, guidance", [
    ("export_fp32", "ORTStableDiffusionPipeline", 7.5),
    ("export_fp16", "ORTStableDiffusionPipeline", 7.5),
    ("export_sdxl", "ORTStableDiffusionXLPipeline", 5.0),  # two encoders, text_embeds, time_ids, hidden states
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
