"""validate: passes on good exports, and fails (never just warns) on a wrong or tampered one."""

from __future__ import annotations

import json
import re
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


def _copy_with_scaled_outputs(src, dst, component, factors):
    """An export whose COMPONENT graph multiplies some outputs by a factor ({output: factor}), manifest updated:
    exactly those outputs are off, by a known amount."""
    shutil.copytree(src, dst)
    path = dst / component / "model.onnx"
    model = onnx.load(path)
    for name, factor in factors.items():
        for node in model.graph.node:  # the graph itself reads the value as exported; only the output is scaled
            for slots in (node.input, node.output):
                for i, tensor in enumerate(slots):
                    if tensor == name:
                        slots[i] = f"{name}__unscaled"
        model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), f"{name}__factor"))
        model.graph.node.append(onnx.helper.make_node("Mul", [f"{name}__unscaled", f"{name}__factor"], [name]))
    onnx.save(model, path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["components"][component]["sha256"] = sha256_file(path)
    (dst / "manifest.json").write_text(json.dumps(manifest))


LINE = re.compile(r"^(PASS|FAIL) (\S+) +(\w+) (\S+)  (\w+): max_abs (\S+) (<=|>) (\S+), rel_l2 (\S+) (<=|>) (\S+)"
                  r"(?:  \((\d+) of (\d+) outputs fail\))?$")


def _ratio(out, limits):
    """metric / threshold, the largest of the output's checks, from validation.json and THRESHOLDS alone."""
    if out["max_abs_err"] is None:
        return float("inf")
    return max(out["max_abs_err"] / (limits["atol"] + limits["rtol"] * out["max_abs_ref"]),
               out["rel_l2_err"] / limits["rel_l2"])


def _check_lines(lines, saved, component):
    """Each result's line names the output furthest past (failing) / closest to (passing) its threshold in
    validation.json and shows that output's metrics against its thresholds."""
    results = [r for r in saved["results"] if r["component"] == component]
    parsed = [m for m in map(LINE.match, lines) if m and m.group(2) == component]
    assert len(parsed) == len(results) > 0, lines
    for line, r in zip(parsed, results):
        status, _, dtype, _, name, abs_v, abs_op, abs_lim, rel_v, rel_op, rel_lim, n_fail, n_out = line.groups()
        limits = saved["thresholds"][r["dtype"]]
        failing = [k for k, o in r["outputs"].items() if not o["pass"]]
        expected = max(failing or list(r["outputs"]), key=lambda k: _ratio(r["outputs"][k], limits))
        out = r["outputs"][expected]
        assert (status, dtype, name) == ("PASS" if r["pass"] else "FAIL", r["dtype"], expected), line.group(0)
        max_abs_limit = limits["atol"] + limits["rtol"] * out["max_abs_ref"]
        for value, op, limit, want_value, want_limit in ((abs_v, abs_op, abs_lim, out["max_abs_err"], max_abs_limit),
                                                         (rel_v, rel_op, rel_lim, out["rel_l2_err"], limits["rel_l2"])):
            assert float(value) == pytest.approx(want_value, rel=1e-2), line.group(0)
            assert float(limit) == pytest.approx(want_limit, rel=6e-2), line.group(0)
            assert op == ("<=" if want_value <= want_limit else ">"), line.group(0)
        assert (int(n_fail) if n_fail else min(len(failing), 1)) == len(failing), line.group(0)
        if n_out:
            assert int(n_out) == len(r["outputs"])
    return parsed


def test_validate_line_names_the_failing_output_and_its_threshold(export_fp32, tmp_path):
    bad = tmp_path / "bad"  # pooler_output 5% off; last_hidden_state as exported (it passes)
    _copy_with_scaled_outputs(export_fp32, bad, "text_encoder", {"pooler_output": 1.05})
    lines = []
    report = validate(bad, device="cpu", components=["text_encoder"], say=lines.append)
    assert not report["passed"]
    saved = json.loads((bad / "validation.json").read_text())
    for r in saved["results"]:
        assert not r["outputs"]["pooler_output"]["pass"] and r["outputs"]["last_hidden_state"]["pass"]
        assert r["reported_output"] == "pooler_output"
    parsed = _check_lines(lines, saved, "text_encoder")
    assert all(p.group(5) == "pooler_output" and p.group(1) == "FAIL" for p in parsed)
    assert all(p.group(10) == ">" for p in parsed)  # rel_l2 5e-2 > 1e-4


def test_validate_line_with_several_failing_outputs_names_the_furthest_and_counts(export_fp32, tmp_path):
    bad = tmp_path / "bad"  # both outputs off; last_hidden_state further (rel_l2 0.5 vs 0.02)
    _copy_with_scaled_outputs(export_fp32, bad, "text_encoder", {"pooler_output": 1.02, "last_hidden_state": 1.5})
    lines = []
    validate(bad, device="cpu", components=["text_encoder"], say=lines.append)
    saved = json.loads((bad / "validation.json").read_text())
    parsed = _check_lines(lines, saved, "text_encoder")
    assert all(p.group(5) == "last_hidden_state" and p.group(12) == "2" for p in parsed)


def test_validate_passing_line_names_the_output_closest_to_its_threshold(export_fp32, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(export_fp32, good)
    lines = []
    assert validate(good, device="cpu", components=["text_encoder", "unet"], say=lines.append)["passed"]
    saved = json.loads((good / "validation.json").read_text())
    for component in ("text_encoder", "unet"):
        assert all(p.group(1) == "PASS" and p.group(12) is None for p in _check_lines(lines, saved, component))


def test_validate_refuses_a_file_that_does_not_match_its_manifest(export_fp32, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(export_fp32, bad)
    with open(bad / "vae_decoder" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        validate(bad, device="cpu", components=["vae_decoder"])
