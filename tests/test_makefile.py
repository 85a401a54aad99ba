"""``make engines``'s decision, run by make itself over a stand-in ``sdexport`` that logs its calls: where
TensorRT engines cannot run (``sdexport env`` says so), the expected path reads as notes and the ONNX is
validated with ONNX Runtime (issue 9, item 20); where they can, a failing TensorRT validation fails the target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fake_venv(tmp_path: Path, can_run: bool, trt_exit: int) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    env = {"backends": {"trt": {"can_build": True, "can_run": can_run,
                                "why": None if can_run else "no CUDA GPU visible; engines can be built but not run"}}}
    (tmp_path / "env.json").write_text(json.dumps(env))
    script = f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls.log
case "$1 $4" in
  "env "*) cat {tmp_path}/env.json ;;
  "validate trt") echo "error: cannot run TensorRT engines here" >&2; exit {trt_exit} ;;
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
    proc = _make(tmp_path, _fake_venv(tmp_path, can_run=False, trt_exit=8))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error:" not in proc.stdout + proc.stderr
    assert "note: the engines" in proc.stdout and "no CUDA GPU visible" in proc.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any(c.startswith("validate") and c.endswith("--backend ort") for c in calls)
    assert not any(c.endswith("--backend trt") for c in calls)


def test_engines_that_should_run_but_fail_fail_the_target(tmp_path):
    proc = _make(tmp_path, _fake_venv(tmp_path, can_run=True, trt_exit=8))
    assert proc.returncode != 0
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any(c.endswith("--backend trt") for c in calls) and not any(c.endswith("--backend ort") for c in calls)
