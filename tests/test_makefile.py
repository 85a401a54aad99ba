"""``make engines``'s decision, run by make itself over a stand-in ``sdexport`` that logs its calls: where
TensorRT engines cannot run (``validate --backend trt`` exits 8), the expected path reads as notes (its reason
included, no ``error:`` line) and the ONNX is validated with ONNX Runtime (issue 9, item 20); any other
TensorRT validation failure fails the target with its error line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


REASON = "cannot run TensorRT engines here: no CUDA GPU visible (on a T4 use TRT=tensorrt)"


def _fake_venv(tmp_path: Path, trt_exit: int) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls.log
case "$1 $4" in
  "validate trt") echo "PASS a progress line" >&2; echo "error: {REASON}" >&2; exit {trt_exit} ;;
esac
exit 0
"""
    (bin_dir / "sdexport").write_text(script)
    (bin_dir / "sdexport").chmod(0o755)
    os.symlink(sys.executable, bin_dir / "python")
    return tmp_path / "venv"


def _make(tmp_path: Path, venv: Path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "-C", str(ROOT), "engines", f"VENV={venv}", "INSTALL=",
                           f"OUT={tmp_path / 'out'}"], capture_output=True, text=True, timeout=60)


def test_engines_that_cannot_run_here_end_with_notes(tmp_path):
    proc = _make(tmp_path, _fake_venv(tmp_path, trt_exit=8))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error:" not in proc.stdout + proc.stderr
    assert "note: the TensorRT engines" in proc.stdout and REASON in proc.stdout  # the reason, as a note
    assert "PASS a progress line" in proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split()[-1] for c in calls if c.startswith("validate")] == ["trt", "ort"]


def test_other_validation_failures_fail_the_target(tmp_path):
    proc = _make(tmp_path, _fake_venv(tmp_path, trt_exit=6))
    assert proc.returncode != 0
    assert f"error: {REASON}" in proc.stderr and "note:" not in proc.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any(c.endswith("--backend ort") for c in calls)


def test_int8_writes_its_calibration_file_under_calibration(tmp_path):
    """`make int8`: export, calibrate into calibration/<model>.npz (the layout's calibration/ directory),
    quantize with that file, validate; in that order, each with the same paths."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = _fake_venv(tmp_path, trt_exit=0)
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "int8", f"VENV={venv}", "INSTALL=", "MODEL=tiny",
                           f"OUT={tmp_path / 'out'}", "CALIB_ARGS=--num-prompts 2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [c.split() for c in (tmp_path / "calls.log").read_text().splitlines()]
    out = str(tmp_path / "out") + "-int8"
    assert [c[0] for c in calls] == ["export", "calibrate", "quantize", "validate"]
    assert calls[1] == ["calibrate", "tiny", "-o", "calibration/tiny.npz", "--num-prompts", "2"]
    assert calls[2] == ["quantize", out, "--calib", "calibration/tiny.npz", "--precision", "int8"]
    assert calls[3] == ["validate", out] and (ROOT / "calibration" / "README.md").is_file()


@pytest.mark.parametrize("target", ["demo", "engines", "int8", "test", "gputest", "trt-check"])
def test_install_empty_uses_the_given_environment_as_it_is(tmp_path, target):
    """`VENV=... INSTALL=` skips the install step for every target that has one: `make trt-check` on a GPU host's
    own environment once made a venv over VENV and pip-installed this checkout into its python."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}", "INSTALL="],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"-m venv {venv}" not in proc.stdout and f"{venv}/bin/python -m pip" not in proc.stdout, proc.stdout
    default = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
                             capture_output=True, text=True, timeout=60)
    assert f"-m venv {venv}" in default.stdout  # without INSTALL= the target installs, so the check can fail
