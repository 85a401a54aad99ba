"""``sdexport env``: the Inductor row (what ``build --backend inductor`` needs here) and the serving row (what
``sdexport serve`` needs), each against facts found independently of sdexport: torch's own compiler lookup,
the nvidia-pytriton wheel's own paths, the libpython this process has mapped, and serve's own environment."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, sdexport_cmd, sdexport_env

from sdexport import inductor, serve
from sdexport.envinfo import describe, format_env


def row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split(" ", 1)[0] == name)


def torch_compiler(env: dict[str, str]) -> str | None:
    """The C++ compiler torch's Inductor itself picks in a process with ``env`` (None: it finds none)."""
    code = ("import torch._inductor.cpp_builder as b, torch._inductor.exc as e\n"
            "try:\n    print(b.get_cpp_compiler())\nexcept e.InvalidCxxCompiler:\n    print('NONE')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = proc.stdout.strip().splitlines()[-1]
    return None if found == "NONE" else found


def env_json(**extra) -> dict:
    proc = subprocess.run(sdexport_cmd("env", "--json"), env=sdexport_env(**extra), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("cxx", [None, "sdexport-no-such-compiler"])
def test_inductor_compiler_is_the_one_torch_finds(cxx):
    """The compiler `env` reports (or its absence) is the one torch's cpp_builder picks in the same environment."""
    extra = {"CXX": cxx} if cxx else {}
    env = sdexport_env(**extra)
    if not cxx:
        env.pop("CXX", None)
    reference = torch_compiler(env)
    proc = subprocess.run(sdexport_cmd("env", "--json"), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["inductor"]
    if reference is None:
        assert report["cxx_path"] is None and report["can_build"] is False and report["devices"] == []
        assert f"$CXX ('{cxx}')" in report["why"] and "not on PATH" in report["why"]
    else:
        import shutil

        assert report["cxx_path"] == shutil.which(reference) and report["can_build"] is True
        assert "cpu" in report["devices"]
    text = subprocess.run(sdexport_cmd("env"), env=env, capture_output=True, text=True, timeout=300).stdout
    line = row(text, "inductor")
    assert ("cannot build" in line) == (reference is None), line
    if reference is None:
        assert "no C++ compiler" in line and "apt-get install g++" in line


def test_inductor_without_compiler_on_path(monkeypatch, tmp_path):
    """g++ (torch's default) missing from PATH: the row says so and names the install; running packages stays."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    status = inductor.host_status("2.13.0", cuda_available=False)
    assert status["cxx"] == "g++" and status["cxx_path"] is None
    assert status["can_build"] is False and status["can_run"] is True and status["device"] is None
    assert "no C++ compiler" in status["why"] and "g++ (torch's default" in status["why"]


def test_inductor_cuda_needs_triton_and_cuda_headers(monkeypatch, tmp_path):
    """A visible GPU: --device cuda is offered only with triton importable and the CUDA headers found where
    torch.utils.cpp_extension looks ($CUDA_HOME/include); otherwise the row names what is missing."""
    compiler = tmp_path / "bin" / "g++"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    monkeypatch.setenv("PATH", str(compiler.parent))
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    monkeypatch.setenv("CUDA_HOME", str(home))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, triton=True):
        if name == "triton":
            return importlib.machinery.ModuleSpec("triton", None) if triton else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec(name, *a, triton=False))
    status = inductor.host_status("2.13.0", cuda_available=True)
    assert status["devices"] == ["cpu"] and status["can_build"] is True and status["cxx_path"] == str(compiler)
    assert status["triton"] is None and status["cuda_home"] == str(home) and status["cuda_include"] is None
    assert "--device cuda cannot build: triton is not installed" in status["why"]
    assert f"{home}/include has no cuda_runtime.h" in status["why"] and "CPU packages only" in status["why"]

    (home / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    status = inductor.host_status("2.13.0", cuda_available=True)
    assert status["devices"] == ["cuda", "cpu"] and status["device"] == "cuda" and status["why"] is None
    assert status["cuda_include"] == str(home / "include") and status["triton"]

    monkeypatch.delenv("CUDA_HOME")  # and no nvcc on PATH: torch falls back to /usr/local/cuda
    home_found, include = inductor.cuda_headers()
    assert home_found == ("/usr/local/cuda" if os.path.exists("/usr/local/cuda") else None)
    assert include == ("/usr/local/cuda/include" if os.path.isfile("/usr/local/cuda/include/cuda_runtime.h")
                       else None)


def test_inductor_row_on_this_host():
    """The real host: torch's version, CUDA as torch sees it, triton as the import system finds it."""
    import torch

    report = describe()
    status = report["inductor"]
    assert status["torch"] == torch.__version__
    assert (status["triton"] is not None) == (importlib.util.find_spec("triton") is not None)
    if not torch.cuda.is_available():
        assert "cuda" not in status["devices"] and "no CUDA GPU visible to torch" in status["why"]
    assert report["backends"]["inductor"]["can_build"] == status["can_build"]
    text = format_env(report)
    assert row(text, "inductor").startswith("inductor " + ("can build" if status["can_build"] else "cannot build"))
    assert "Inductor: C++ compiler" in text


def test_serve_row_without_pytriton(monkeypatch):
    """nvidia-pytriton not importable: serve cannot start, and the row gives the install line serve gives."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real_find_spec(name, *a))
    status = serve.host_status()
    assert status["can_run"] is False and status["tritonserver"] is None
    assert status["why"] == f"serving needs nvidia-pytriton: {serve.TRITON_PACKAGES}"
    line = row(format_env({**describe(), "serve": status}), "serve")
    assert "cannot start here" in line and "pip install nvidia-pytriton==0.7.0" in line


def test_serve_row_on_this_host(tmp_path):
    """With the wheel installed: its tritonserver (the path the wheel itself gives), its stub for this Python,
    this process's own libpython, and the LD_LIBRARY_PATH serve really gives tritonserver."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("nvidia-pytriton is not installed here (pip install nvidia-pytriton==0.7.0)")
    from pytriton.utils.distribution import get_root_module_path

    status = describe()["serve"]
    assert status["can_run"] is True, status["why"]
    root = Path(get_root_module_path()) / "tritonserver"
    assert Path(status["tritonserver"]) == root / "bin" / "tritonserver"
    version = "%d.%d" % sys.version_info[:2]
    assert Path(status["stub"]) == root / "python_backend_stubs" / version / "triton_python_backend_stub"
    mapped = {Path(line.split()[-1]).resolve() for line in Path("/proc/self/maps").read_text().splitlines()
              if "libpython" in line}
    assert mapped == {Path(status["libpython"]).resolve()}  # the libpython this interpreter runs on
    env = serve.TritonInstall.find().environment(tmp_path)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == status["ld_library_path_first"]
    assert Path(status["ld_library_path_first"]) == Path(status["libpython"]).parent
    line = row(run_cli("env").stdout, "serve")
    assert "can start here" in line and status["tritonserver"] in line
    assert f"puts {status['ld_library_path_first']} first on LD_LIBRARY_PATH itself" in line


def test_json_keeps_every_row():
    """--json has the new sections next to the old ones; the text has one row per backend and the serving row."""
    report = env_json()
    assert {"torch", "ort", "trt", "inductor"} <= set(report["backends"])
    assert {"can_run", "why", "tritonserver", "libpython", "ld_library_path_first"} <= set(report["serve"])
    assert {"nvidia-pytriton", "triton", "tritonclient"} <= set(report["versions"])
    text = run_cli("env").stdout
    for name in ("torch", "ort", "trt", "inductor", "serve"):
        row(text, name)
