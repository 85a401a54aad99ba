"""validate: passes on good exports, and fails (never just warns) on a wrong or tampered one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sdexport.errors import IntegrityError
from sdexport.manifest import sha256_file
from sdexport.validate import THRESHOLDS, validate


@pytest.mark.parametrize("fixture", ["export_fp32", "export_fp16"])
def test_validate_passes_and_covers_the_range(fixture, request):
    export_dir = request.getfixturevalue(fixture)
    report = validate(export_dir, device="cpu")
    assert report["passed"], [r for r in report["results"] if not r["pass"]]
    saved = json.loads((export_dir / "validation.json").read_text())
    assert saved["passed"] and saved["thresholds"] == THRESHOLDS
    unet = [r for r in report["results"] if r["component"] == "unet"]
    shapes = [r["input_shapes"]["sample"] for r in unet]
    assert len(shapes) >= 3
    assert any(s[2] != s[3] for s in shapes), "a non-square latent"
    assert {s[0] for s in shapes} - {2}, "a batch other than the export's (2)"
    assert min(s[2] for s in shapes) == 8 and max(max(s[2], s[3]) for s in shapes) == 32, "both ends of the range"
    for r in report["results"]:
        for out in r["outputs"].values():
            assert out["rel_l2_err"] <= THRESHOLDS[r["dtype"]]["rel_l2"]
            assert np.isfinite(out["max_abs_err"])


def _copy_with_scaled_weight(src, dst, factor):
    """An export whose UNet has one conv weight scaled: valid ONNX, wrong numbers, manifest updated."""
    shutil.copytree(src, dst)
    path = dst / "unet" / "model.onnx"
    model = onnx.load(path)
    init = next(i for i in model.graph.initializer if "conv_in" in i.name and i.name.endswith("weight"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["components"]["unet"]["sha256"] = sha256_file(path)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_validate_fails_on_wrong_numbers(export_fp32, tmp_path):
    bad = tmp_path / "bad"
    _copy_with_scaled_weight(export_fp32, bad, 1.05)
    report = validate(bad, device="cpu", components=["unet"])
    assert not report["passed"]
    assert all(not r["pass"] for r in report["results"])


def test_validate_refuses_a_file_that_does_not_match_its_manifest(export_fp32, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(export_fp32, bad)
    with open(bad / "vae_decoder" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        validate(bad, device="cpu", components=["vae_decoder"])
