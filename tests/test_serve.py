"""sdexport serve: a real Triton server (the tritonserver binary of nvidia-pytriton) on the tiny preset, in a
subprocess, driven through tritonclient (HTTP and gRPC); images against `sdexport infer` pixel for pixel.

The module's server waits 300 ms for a batch to fill, so requests fired together are batched, and its queue
holds 6 requests, so a burst overflows it. Its last test stops it with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import conftest
from conftest import assert_error, run_cli

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

from tritonclient.utils import InferenceServerException  # noqa: E402

sys.path.insert(0, str(conftest.REPO_ROOT / "benchmarks"))
from serve_load import free_ports  # noqa: E402  (one home: the load benchmark starts its servers so too)
from test_int8 import calib, int8_export  # noqa: E402,F401  (fixtures: an export with its INT8 UNet)
from test_img2img import png_header_only  # noqa: E402
from sdexport.errors import SdexportError  # noqa: E402
from sdexport.serve import (CLIENT_EXAMPLE, CURL_EXAMPLE, TRITONSERVER_EXAMPLE,  # noqa: E402
                            CachedTextEncoder, ImageService, batch_groups, client_inputs, parse_request,
                            request_defaults)

MODEL = "sdexport"
STARTUP_S = 180


class Server:
    """`sdexport serve` in a subprocess; ready when it prints its 'ready:' line (it prints it only after
    Triton reports ready, i.e. engines loaded and warm-up done)."""

    def __init__(self, export, log: Path, *args, env: dict | None = None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = log
        self.proc = subprocess.Popen(
            conftest.sdexport_cmd("serve", export, "--http-port", self.http, "--grpc-port", self.grpc,
                                  "--metrics-port", self.metrics, *args),
            env=conftest.sdexport_env(**(env or {})), stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.ready_line = self._read_ready()

    def _read_ready(self) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(STARTUP_S)
        if not lines or not lines[0].startswith("ready:"):
            self.proc.kill()
            raise AssertionError(f"server not ready (exit {self.proc.poll()}); log tail:\n{self.log_tail()}")
        return lines[0]

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def http_client(self):
        return tritonclient_http.InferenceServerClient(f"127.0.0.1:{self.http}", network_timeout=300,
                                                       concurrency=16)

    def grpc_client(self):
        return tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics_text().splitlines()
                   if line.startswith(name + "{") and f'model="{MODEL}"' in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def infer_image(export, tmp_path, name, **kw) -> np.ndarray:
    """The image `sdexport infer` writes for these settings (its PNG, decoded)."""
    from PIL import Image

    out = tmp_path / f"{name}.png"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    result = run_cli("infer", export, "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    return np.asarray(Image.open(out))


def fire(calls) -> list:
    """Run the callables at the same moment (a barrier), one thread each; results or exceptions in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 -- the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def request(server_or_client, module, **values):
    """One inference; given a Server, on a client of its own (tritonclient clients are not thread-safe)."""
    client = server_or_client
    if isinstance(server_or_client, Server):
        client = server_or_client.http_client() if module is tritonclient_http else server_or_client.grpc_client()
    return client.infer(MODEL, client_inputs(module, **values))


def timings(result) -> list[dict]:
    return [json.loads(t[0]) for t in result.as_numpy("timings")]


# --- in-process: the service without Triton --------------------------------------------------------------

@pytest.fixture(scope="module")
def service(export_fp32):
    service = ImageService(export_fp32, text_cache_size=3)
    yield service
    service.close()


tensors = conftest.request_tensors


@pytest.mark.parametrize("values,field", [
    (dict(seed=1), "prompt: missing"),
    (dict(prompt="x", steps=0), "steps 0: must be at least 1"),
    (dict(prompt="x", steps=1001), "steps 1001: must be at most 1000"),
    # steps the scheduler cannot make (infer's dry run): served, they were an HTTP 500 (IndexError) after the work
    (dict(prompt="x", steps=1000), "steps 1000: scheduler PNDMScheduler cannot run 1000 steps"),
    (dict(prompt="x", steps=999, scheduler="dpm++2m"), "steps 999: scheduler dpm++2m cannot run 999 steps"),
    (dict(prompt="x", guidance_scale=float("nan")), "guidance_scale nan: must be a finite"),
    (dict(prompt="x", guidance_scale=float("inf")), "guidance_scale inf: must be a finite"),
    (dict(prompt="x", guidance_scale=-0.5), "guidance_scale -0.5: must not be negative"),
    (dict(prompt="x", scheduler="heun"), "scheduler: unknown 'heun'"),
    (dict(prompt="x", height=72), "height 72 is not a multiple of 16"),
    (dict(prompt="x", width=512), "width 512 is outside the exported range [64, 256]"),
    (dict(prompt=b"\xff\xfe"), "prompt: not UTF-8"),
    (dict(prompt=7), "prompt: text expected"),
    # infer's bound on a prompt (limits.MAX_PROMPT_CHARS): a 2 MB prompt was tokenized for 3 s, then served
    (dict(prompt="x" * 16385), "prompt: 16,385 characters; at most 16,384"),
    (dict(prompt="x", negative_prompt="word " * 400_000), "negative_prompt: 2,000,000 characters; at most 16,384"),
    (dict(prompt=["a", "b"], height=[64, 128]), "height: the images of one request must share"),
    (dict(prompt=["a", "b"], seed=[1]), "seed: 1 value(s) for the 2 image(s) of 'prompt'"),
])
def test_bad_inputs_are_refused_naming_the_input(service, values, field):
    from sdexport.errors import SdexportError

    with pytest.raises(SdexportError) as exc:
        service.parse(tensors(**values))
    assert str(exc.value).startswith(field), str(exc.value)


def test_parse_fills_the_infer_defaults_and_accepts_the_edges(service):
    (image,) = service.parse(tensors(prompt="x"))
    assert (image.steps, image.guidance_scale, image.seed, image.negative_prompt, image.scheduler) == (30, 7.5, 0, None,
                                                                                                       None)
    assert image.height == image.width == 128  # the tiny preset's native size, as in infer
    edges = service.parse(tensors(prompt=["a", "b"], steps=[1, 1000], guidance_scale=[0.0, 100.0], height=[64, 64],
                                  width=[256, 256], scheduler=["", "euler-a"], seed=[-(2**63), 2**63 - 1]))
    assert [e.scheduler for e in edges] == [None, "euler-a"] and edges[1].seed == 2**63 - 1
    (longest,) = service.parse(tensors(prompt="x" * 16384, negative_prompt="y" * 16384))  # infer's longest
    assert (len(longest.prompt), len(longest.negative_prompt)) == (16384, 16384)


def test_negative_prompt_without_guidance_warns_once_a_process(export_fp32):
    """serve's requests run Pipeline.__call__ as infer's does: a negative prompt at guidance <= 1 (not used)
    is one warning through the model's logger (warn=), once a process, not once a request; none at 7.5."""
    said: list[str] = []
    service = ImageService(export_fp32, warn=said.append)
    try:
        for guidance in (7.5, 0.0, 1.0):
            (served,) = service.run([service.parse(tensors(prompt="a kite", negative_prompt="blurry", steps=1,
                                                           guidance_scale=guidance, height=64, width=64))])
            assert served.error is None, served.error
            assert sum("negative prompt is not used" in m for m in said) == (0 if guidance > 1 else 1), said
    finally:
        service.close()


def test_groups_share_shape_steps_scheduler_and_guidance():
    from sdexport.serve import ImageRequest

    def im(steps=2, h=64, scheduler=None, g=7.5):
        return ImageRequest("p", "", 0, steps, g, h, 64, scheduler)

    reqs = [[im(), im(steps=3)], [im()], [im(h=128)], [im(scheduler="ddim"), im(g=1.0)], [im(), im()]]
    groups = batch_groups(reqs, max_images=3)
    assert groups == [[(0, 0), (1, 0), (4, 0)], [(4, 1)], [(0, 1)], [(2, 0)], [(3, 0)], [(3, 1)]]


def test_text_cache_is_bounded_lru_and_gives_the_engines_rows(export_fp32):
    import torch

    from sdexport.backends import load_engines

    inner = load_engines(export_fp32, "ort", components=["text_encoder"])["text_encoder"]
    cache = CachedTextEncoder(inner, capacity=2)
    ids = torch.randint(0, 49407, (4, 77), dtype=torch.int32)
    first = cache({"input_ids": ids[[0, 1, 0]]})  # row 0 twice: computed once
    assert (cache.hits, cache.misses, len(cache.rows)) == (1, 2, 2)
    want = inner({"input_ids": ids[[0, 1, 0]]})
    for name in want:
        assert torch.equal(first[name], want[name])
    cache({"input_ids": ids[[2]]})  # evicts row 1 (least recently used), keeps row 0
    assert len(cache.rows) == 2 and cache({"input_ids": ids[[0]]}) and cache.hits == 2
    cache({"input_ids": ids[[1]]})
    assert cache.misses == 4


def test_a_failing_pipeline_call_fails_only_its_requests(service, monkeypatch):
    call = service.pipe.__call__

    def flaky(prompt, **kw):
        if kw["steps"] == 2:
            raise RuntimeError("boom")
        return call(prompt, **kw)

    monkeypatch.setattr(service, "pipe", flaky)
    parsed = [service.parse(tensors(prompt="a", steps=1, height=64, width=64)),
              service.parse(tensors(prompt="b", steps=2, height=64, width=64)), ValueError("bad request")]
    served = service.run(parsed)
    assert served[0].error is None and served[0].images.shape == (1, 64, 64, 3)
    assert isinstance(served[1].error, RuntimeError) and isinstance(served[2].error, ValueError)


# --- image inputs and LoRA (in-process) -------------------------------------------------------------------

def png_bytes(height: int, width: int, seed: int = 0, mode: str = "RGB") -> bytes:
    import io

    from test_img2img import noise_image

    buffer = io.BytesIO()
    noise_image(height, width, seed, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("values,field", [
    (dict(prompt="x", image=b"not an image"), "image: not an image PIL can read (cannot identify image file)"),
    (dict(prompt="x", image=7), "image: encoded image bytes expected, got int"),
    (dict(prompt="x", image=png_bytes(64, 64), strength=0.0), "strength 0.0: must be in (0, 1]"),
    (dict(prompt="x", image=png_bytes(64, 64), strength=float("nan")), "strength nan: must be in (0, 1]"),
    (dict(prompt="x", strength=0.5), "strength applies to image"),
    (dict(prompt="x", mask=png_bytes(64, 64, mode="L")), "mask needs image"),
    (dict(prompt="x", image=png_bytes(64, 64), mask=png_bytes(64, 64, mode="L")), "mask: "),
    (dict(prompt="x", image=png_bytes(320, 128)), "image is 128x320 px"),
    # pixels beyond limits.MAX_INPUT_PIXELS (8192x8192, any model): refused from the header, before decoding
    (dict(prompt="x", image=png_header_only(8192, 8193)), "image: 8193x8192 px is 67,117,056 pixels; at most "
     "67,108,864 (8192x8192) are read"),
    (dict(prompt="x", image=png_header_only(9000, 9000)), "image: 9000x9000 px is 81,000,000 pixels; at most"),
    (dict(prompt="x", image=png_bytes(64, 64), mask=png_header_only(9000, 9000)), "mask: 9000x9000 px"),
    (dict(prompt="x", image=png_bytes(64, 64), strength=0.3, steps=3), "strength 0.3 with steps 3 leaves no"),
])
def test_bad_image_inputs_are_refused_naming_the_input(service, values, field):
    from sdexport.errors import SdexportError

    with pytest.raises(SdexportError) as exc:
        service.parse(tensors(**values))
    assert str(exc.value).startswith(field), str(exc.value)
    assert "--" not in str(exc.value)  # the inputs' names, not infer's options


def test_image_requests_keep_the_image_size_and_batch_by_image(service):
    import io

    from PIL import Image

    flat = io.BytesIO()
    Image.new("L", (8192, 8192)).save(flat, format="PNG")  # 64 KB of PNG, 67 MP once decoded
    (bound,) = service.parse(tensors(prompt="x", image=flat.getvalue(), height=64, width=64))
    assert bound.image.size == (8192, 8192)  # the most pixels any model takes (limits.MAX_INPUT_PIXELS)
    a, b = png_bytes(96, 128, seed=1), png_bytes(96, 128, seed=2)
    (one,) = service.parse(tensors(prompt="x", image=a))
    assert (one.height, one.width, one.strength) == (96, 128, None)  # infer keeps the image's size
    (resized,) = service.parse(tensors(prompt="x", image=a, height=64, width=64))
    assert (resized.height, resized.width) == (64, 64)
    (empty,) = service.parse(tensors(prompt="x", image=b""))  # "": no image, as absent
    assert empty.image is None and empty.height == 128
    reqs = [service.parse(tensors(prompt=["p", "q"], image=[a, a], seed=[1, 2], height=[96, 96], width=[128, 128])),
            service.parse(tensors(prompt="r", image=b, height=96, width=128)),
            service.parse(tensors(prompt="s", image=a, strength=0.5, height=96, width=128)),
            service.parse(tensors(prompt="t", image=a, height=96, width=128))]
    assert batch_groups(reqs, max_images=4) == [[(0, 0), (0, 1), (3, 0)], [(1, 0)], [(2, 0)]]


def test_inpainting_images_run_one_per_call():
    """diffusers draws an inpainting batch's image latents from its first generator, so batched inpainting
    images would differ from infer's: they get a group each (image-to-image images share one)."""
    from sdexport.serve import ImageRequest

    def im(seed, mask):
        return ImageRequest("p", None, seed, 2, 7.5, 64, 64, None, image="i", mask=mask, image_key="k")

    assert batch_groups([[im(1, "m"), im(2, "m"), im(1, "m")]], 4) == [[(0, 0), (0, 2)], [(0, 1)]]
    assert batch_groups([[im(1, None), im(2, None)]], 4) == [[(0, 0), (0, 1)]]


def test_img2img_images_equal_infer(service, export_fp32, tmp_path):
    image = png_bytes(96, 128, seed=5)
    (tmp_path / "in.png").write_bytes(image)
    kw = dict(steps=3, guidance_scale=6.0, scheduler="euler-a", strength=0.7)
    (served,) = service.run([service.parse(tensors(prompt=["a boat", "a cat"], seed=[1, 2], image=[image, image],
                                                   negative_prompt=["", "dark"], **{k: [v, v] for k, v in kw.items()}))])
    assert served.error is None and served.images.shape == (2, 96, 128, 3)
    assert [t["images_in_call"] for t in served.timings] == [2, 2] and served.timings[0]["vae_encoder_ms"] > 0
    for got, prompt, seed, negative in zip(served.images, ["a boat", "a cat"], [1, 2], ["", "dark"]):
        want = infer_image(export_fp32, tmp_path, f"i{seed}", prompt=prompt, seed=seed, negative_prompt=negative,
                           image=tmp_path / "in.png", **kw)
        assert np.array_equal(got, want), f"seed {seed}: {(got != want).sum()} pixels differ"


def test_negative_seeds_are_infers_seeds_past_2_to_the_63(service, export_fp32, tmp_path):
    """INT64 holds half of infer's seeds (0 to 2^64-1): a negative seed s is infer's s + 2^64 (torch's manual_seed
    wraps so), as the README says; batched with another one."""
    kw = dict(steps=2, height=64, width=64)
    (served,) = service.run([service.parse(tensors(prompt=["x", "x"], seed=[-1, -(2**63)],
                                                   **{k: [v, v] for k, v in kw.items()}))])
    assert served.error is None and [t["images_in_call"] for t in served.timings] == [2, 2]
    for got, seed in zip(served.images, [2**64 - 1, 2**63]):
        want = infer_image(export_fp32, tmp_path, f"s{seed}", prompt="x", seed=seed, **kw)
        assert np.array_equal(got, want), f"seed {seed}: {(got != want).sum()} pixels differ"


@pytest.fixture(scope="module")
def serve_lora(tiny_model, tmp_path_factory):
    from test_lora import _peft_lora

    return _peft_lora(tiny_model, tmp_path_factory.mktemp("serve-lora") / "style.safetensors", 7,
                      ["to_q", "to_v", "conv1"], ["q_proj"])


def test_service_with_a_lora_equals_infer_with_it(export_fp32, serve_lora, tmp_path):
    service = ImageService(export_fp32, loras=[f"{serve_lora}:0.8"])
    try:
        (served,) = service.run([service.parse(tensors(prompt="a kite", seed=3, steps=2, height=64, width=96))])
    finally:
        service.close()
    want = infer_image(export_fp32, tmp_path, "lora", prompt="a kite", seed=3, steps=2, height=64, width=96,
                       lora=f"{serve_lora}:0.8")
    plain = infer_image(export_fp32, tmp_path, "plain", prompt="a kite", seed=3, steps=2, height=64, width=96)
    assert np.array_equal(served.images[0], want) and not np.array_equal(want, plain)


def test_service_with_the_int8_unet_equals_infer_unet_int8(int8_export, tmp_path):
    """In process: ImageService(unet="int8") gives `infer --unet int8`'s pixels, not the FP32 UNet's."""
    request = dict(prompt="a teapot", seed=2, steps=3, height=64, width=64)
    service = ImageService(int8_export, unet="int8")
    try:
        (served,) = service.run([service.parse(tensors(**request))])
    finally:
        service.close()
    want = infer_image(int8_export, tmp_path, "int8", unet="int8", **request)
    plain = infer_image(int8_export, tmp_path, "plain", **request)
    assert np.array_equal(served.images[0], want) and not np.array_equal(want, plain)
    assert served.timings[0]["unet"] == "int8"


def test_a_lora_switched_later_is_not_served_from_the_text_cache(export_fp32, serve_lora, tmp_path):
    """Text-encoder rows cached before a switch were encoded with the old weights: after set_loras the same
    prompt gives infer's image with the LoRA, not a blend of cached old rows and the new UNet."""
    service = ImageService(export_fp32)
    request = dict(prompt="a kite", seed=3, steps=2, height=64, width=96)
    try:
        service.run([service.parse(tensors(**request))])
        service.pipe.set_loras([f"{serve_lora}:0.8"])
        (served,) = service.run([service.parse(tensors(**request))])
    finally:
        service.close()
    want = infer_image(export_fp32, tmp_path, "lora", lora=f"{serve_lora}:0.8", **request)
    assert np.array_equal(served.images[0], want)


def test_serve_lora_errors_before_starting(export_fp32, serve_lora, tmp_path):
    from sdexport.errors import IntegrityError
    from sdexport.lora import LoraFile, open_loras

    assert_error(run_cli("serve", export_fp32, "--lora", tmp_path / "none.safetensors"), 2, "no such file")
    assert_error(run_cli("serve", export_fp32, "--lora", f"{serve_lora}:inf"), 2, "not a finite number")
    repo = tmp_path / "repo"
    result = run_cli("serve", export_fp32, "--write-repository", repo, "--lora", f"{serve_lora}:0.5")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(json.loads(re.search(r'key: "loras" value: \{ string_value: (".*") \}',
                                                (repo / MODEL / "config.pbtxt").read_text()).group(1)))
    assert record == open_loras([f"{serve_lora}:0.5"])[0].to_json()
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(serve_lora.read_bytes())
    record = {**record, "file": str(changed)}
    assert LoraFile.recorded(record, "served").scale == 0.5
    changed.write_bytes(serve_lora.read_bytes()[:-1] + b" ")
    with pytest.raises(IntegrityError, match="the LoRA served is changed"):
        LoraFile.recorded(record, "served")
    changed.write_bytes(serve_lora.read_bytes()[:300])
    with pytest.raises(IntegrityError, match="not a LoRA this model can load"):  # before any request is served
        ImageService(export_fp32, loras=[str(changed)])


def test_refiner_warms_up_from_an_image_and_refuses_text_only(export_refiner):
    from sdexport.errors import SdexportError

    service = ImageService(export_refiner)
    try:
        service.warm_up([(80, 80, 1)], steps=2)
        with pytest.raises(SdexportError, match="^image: .*SDXL refiner.*give it image"):
            service.parse(tensors(prompt="x"))
        (served,) = service.run([service.parse(tensors(prompt="x", image=png_bytes(80, 80), steps=4))])
        assert served.error is None and served.images.shape == (1, 80, 80, 3)
    finally:
        service.close()


def test_examples_are_in_the_readme():
    readme = (conftest.REPO_ROOT / "README.md").read_text()
    assert CURL_EXAMPLE in readme and CLIENT_EXAMPLE in readme and f"```bash\n{TRITONSERVER_EXAMPLE}\n```" in readme


def test_help_prints_the_examples_as_they_paste():
    """`sdexport serve --help` prints the curl and tritonclient examples verbatim at column 0, so that pasted from
    the terminal they run as the README's do (indented, the curl block's `python3 -c` fails with IndentationError
    and the tritonclient block with 'unexpected indent')."""
    result = run_cli("serve", "--help")
    assert result.exit_code == 0, result.output
    for example in (CURL_EXAMPLE, CLIENT_EXAMPLE):
        assert f"\n{example}\n" in result.stdout, result.stdout
    assert result.stdout.index("--write-repository") < result.stdout.index(CURL_EXAMPLE)


# --- the Triton install and the stub's environment ----------------------------------------------------------

def test_stub_environment_finds_this_libpython_numpy_and_sdexport(tmp_path):
    """The issue's failure: the stub's dynamic linker found the system's libpython (another patch release).
    Here this interpreter's LIBDIR comes first, and the stub's Python (``python3`` first on PATH) imports the
    numpy and the sdexport this process imports."""
    import sysconfig

    from sdexport.serve import TritonInstall

    triton = TritonInstall.find()
    env = triton.environment(tmp_path)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[:2] == [sysconfig.get_config_var("LIBDIR"), str(triton.libs)]
    python3 = Path(env["PATH"].split(os.pathsep)[0]) / "python3"
    out = subprocess.run([python3, "-I", "-c", "import sys, numpy, sdexport; print(sys.prefix, numpy.__file__, "
                          "sdexport.__file__)"], capture_output=True, text=True, env={"PATH": env["PATH"]})
    prefix, numpy_file, sdexport_file = out.stdout.split()
    import sdexport

    assert prefix == str(tmp_path / "python")
    assert numpy_file == np.__file__ and sdexport_file == sdexport.__file__


def test_numpy_2_is_refused_with_the_reason(monkeypatch):
    from importlib import metadata

    from sdexport.errors import BackendUnavailable
    from sdexport.serve import TritonInstall

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2.1.0" if name == "numpy" else real(name))
    with pytest.raises(BackendUnavailable, match=r"numpy 2\.1\.0 .* needs numpy < 2"):
        TritonInstall.find()


# --- CLI errors before any server starts -------------------------------------------------------------------

def test_serve_refuses_bad_options_before_starting(export_fp32, tmp_path):
    assert_error(run_cli("serve", tmp_path / "nope"), 5, "no such export directory")
    assert_error(run_cli("serve", export_fp32, "--max-batch", 5), 2, "--max-batch 5", "1 to 4")
    assert_error(run_cli("serve", export_fp32, "--max-batch", 0), 2, "--max-batch 0")
    # the export's range, naming the option as every other option's error does (it said only 'height 72 ...')
    assert_error(run_cli("serve", export_fp32, "--warmup", "72x64"), 4, "--warmup 72x64: height 72 is not a multiple")
    assert_error(run_cli("serve", export_fp32, "--warmup", "9999x9999"), 4, "--warmup 9999x9999: height 9999")
    assert_error(run_cli("serve", export_fp32, "--warmup", "64x64x1", "--warmup", "64x4096x2"), 4, "--warmup 64x4096x2: width 4096 "
                 "is outside the exported range")
    assert_error(run_cli("serve", export_fp32, "--warmup", "64"), 2, "--warmup takes HEIGHTxWIDTH in pixels or "
                 "HEIGHTxWIDTHxIMAGES, e.g. 1024x1024 or 1024x1024x4 (got '64')")
    assert_error(run_cli("serve", export_fp32, "--warmup", "64x64x3", "--max-batch", 2), 2, "more images")
    assert_error(run_cli("serve", export_fp32, "--device", "cpu", "--gpus", "0"), 2, "--gpus needs --device cuda")
    assert_error(run_cli("serve", export_fp32, "--gpus", "0,x"), 2, "--gpus 0,x")
    assert_error(run_cli("serve", export_fp32, "--http-port", 9000, "--grpc-port", 9000), 2, "distinct ports")
    assert_error(run_cli("serve", export_fp32, "--max-queue-size", 0), 2, "--max-queue-size")
    assert_error(run_cli("serve", export_fp32, "--model-name", "a/b"), 2, "--model-name 'a/b'")
    for option, value, least in (("--warmup-steps", 0, 1), ("--drain-timeout-s", 0, 1), ("--text-cache-size", -1, 0)):
        assert_error(run_cli("serve", export_fp32, option, value), 2, f"{option} {value}: must be at least {least}")
    # infer's dry run of the schedule: these failed inside Triton's model load ("tritonserver exited with status 1")
    assert_error(run_cli("serve", export_fp32, "--warmup-steps", 1000), 2,
                 "--warmup-steps 1000: scheduler PNDMScheduler cannot run 1000 steps", only_line=True)
    assert_error(run_cli("serve", export_fp32, "--scheduler", "dpm++2m", "--warmup-steps", 999), 2,
                 "--warmup-steps 999: scheduler dpm++2m cannot run 999 steps", only_line=True)
    import torch

    if not torch.cuda.is_available():  # the line every command gives, not one about a --gpus nobody passed
        assert_error(run_cli("serve", export_fp32, "--device", "cuda"), 8, "--device cuda: no CUDA GPU is visible")
        # as infer and bench refuse it; it used to start Triton, whose log and the model's traceback came first
        assert_error(run_cli("serve", export_fp32, "--step-graph"), 2, "--step-graph needs a CUDA device",
                     only_line=True)
    # engines the backend needs and the export lacks: one line before Triton starts, not Triton's failed load
    assert_error(run_cli("serve", export_fp32, "--backend", "trt"), 5, "no TensorRT engine for text_encoder",
                 only_line=True)
    assert_error(run_cli("serve", export_fp32, "--backend", "inductor"), 5, "no Inductor engines", only_line=True)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, grpc = free_ports(2)
        assert_error(run_cli("serve", export_fp32, "--http-port", http, "--grpc-port", grpc, "--metrics-port", port),
                     2, f"--metrics-port {port}", "cannot listen on 127.0.0.1")


def test_serve_unet_int8_is_refused_as_infer_refuses_it(export_fp32, tmp_path):
    """--unet int8 takes infer's rule, and its line: on an export without unet_int8, exit 5 in one line before
    Triton starts (and before --write-repository writes anything); with --backend torch, exit 2; on TensorRT with
    a UNet engine that is not INT8, exit 2."""
    trt_fp16 = conftest.copy_export(export_fp32, tmp_path / "trt", with_engines=False)
    data = json.loads((trt_fp16 / "manifest.json").read_text())
    data["engines"]["unet"] = {"file": "engines/unet.fp16.plan", "sha256": "0" * 64, "precision": "fp16"}
    (trt_fp16 / "manifest.json").write_text(json.dumps(data))
    for export, args, code, needle in ((export_fp32, [], 5, "no unet_int8 (--unet int8)"),
                                       (export_fp32, ["--backend", "torch"], 2, "torch backend"),
                                       (trt_fp16, ["--backend", "trt"], 2, "UNet engine in")):
        served = run_cli("serve", export, "--unet", "int8", *args)
        assert_error(served, code, needle, only_line=True)
        inferred = run_cli("infer", export, "--prompt", "x", "-o", tmp_path / "x.png", "--unet", "int8", *args)
        assert_error(inferred, code, needle)
        assert served.stderr.strip() == inferred.stderr.strip().splitlines()[-1]
    assert_error(run_cli("serve", export_fp32, "--unet", "int8", "--write-repository", tmp_path / "repo"), 5,
                 "no unet_int8", only_line=True)
    assert not (tmp_path / "repo").exists()


def test_write_repository(export_fp32, tmp_path):
    repo = tmp_path / "repo"
    result = run_cli("serve", export_fp32, "--write-repository", repo, "--device", "cuda", "--gpus", "0,1",
                     "--max-batch", 3, "--max-queue-delay-ms", 2.5, "--max-queue-size", 7, "--warmup", "64x96x2")
    assert result.exit_code == 0, result.stderr
    config = (repo / MODEL / "config.pbtxt").read_text()
    for needle in ("max_batch_size: 3", "max_queue_delay_microseconds: 2500", "max_queue_size: 7",
                   "kind: KIND_GPU gpus: [ 0, 1 ]", 'backend: "python"', '"64x96x2"',
                   f'key: "export_dir" value: {{ string_value: "{Path(export_fp32).resolve()}" }}',
                   'name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }',
                   'name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true',
                   'name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ]'):
        assert needle in config, needle
    assert "from sdexport.serve import TritonPythonModel" in (repo / MODEL / "1" / "model.py").read_text()
    assert sorted(p.name for p in repo.iterdir()) == [MODEL]  # nothing left under a temporary name
    from sdexport.pipeline import SCHEDULERS

    (scheduler,) = [line for line in config.splitlines() if 'name: "scheduler"' in line]
    assert f"# {', '.join(SCHEDULERS)} (" in scheduler, scheduler  # every name infer takes, as the 400 lists them


@pytest.mark.parametrize("extra, warmups", [
    (["--step-graph", "--warmup", "64x96"], "64x96x1,64x96x2,64x96x3"),  # a step graph per batch size
    (["--step-graph"], "128x128x1,128x128x2,128x128x3"),  # the default shape: the native size (tiny: 128 px)
    (["--step-graph", "--warmup", "64x96x2"], "64x96x2"),  # N given: that one
    (["--warmup", "64x96"], "64x96x1"),  # no step graphs: one image
    ([], "128x128x1"),
])
def test_warmup_captures_every_batch_size_with_step_graphs(export_fp32, tmp_path, extra, warmups):
    """Dynamic batching makes any batch size up to --max-batch, and a step graph is captured per size: with
    --step-graph, HxW warms up every size before the server reports ready (on an H100, captures left to the
    first requests of each size took most of a second GPU's throughput)."""
    repo = tmp_path / "repo"
    result = run_cli("serve", export_fp32, "--write-repository", repo, "--device", "cuda", "--max-batch", 3, *extra)
    assert result.exit_code == 0, result.stderr
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert f'key: "warmup" value: {{ string_value: "{warmups}" }}' in config
    # with step graphs the warm-up runs the default request's steps (empty: resolved by the model), else 2
    steps = "" if "--step-graph" in extra else "2"
    assert f'key: "warmup_steps" value: {{ string_value: "{steps}" }}' in config


def test_serve_scheduler_is_the_default_of_requests_and_warm_up(export_fp32, tmp_path):
    repo = tmp_path / "repo"
    result = run_cli("serve", export_fp32, "--write-repository", repo, "--scheduler", "euler", "--warmup-steps", 7)
    assert result.exit_code == 0, result.stderr
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'key: "scheduler" value: { string_value: "euler" }' in config
    assert 'key: "warmup_steps" value: { string_value: "7" }' in config
    assert_error(run_cli("serve", export_fp32, "--write-repository", tmp_path / "r2", "--scheduler", "heun"), 2,
                 "--scheduler heun: unknown")
    assert not (tmp_path / "r2").exists()


class _FakeTorch:
    def __init__(self, count):
        self.cuda = self
        self.count, self.current = count, None

    def device_count(self):
        return self.count

    def set_device(self, device):
        self.current = device


@pytest.mark.parametrize("visible,modules,count,want_env,want", [
    (None, {}, 1, "1", ("cuda:0", "cuda:1")),  # narrowed to its GPU: cuda:0 of its own
    ("4,5", {}, 1, "5", ("cuda:0", "cuda:5")),  # Triton's device 1 is the server's 2nd visible GPU
    ("4,5", {"torch": None}, 2, "4,5", ("cuda:1", "cuda:5")),  # CUDA may be up already: not narrowed
    (None, {"onnxruntime": None}, 2, None, ("cuda:1", "cuda:1")),
    (None, {}, 2, "1", ("cuda:1", "cuda:1")),  # the narrowing did not take (CUDA initialised before): as is
])
def test_a_gpu_instance_sees_only_its_gpu(visible, modules, count, want_env, want):
    """A KIND_GPU instance (its own stub process) is narrowed to its GPU before CUDA starts in it, so nothing it
    loads can make a context or run kernels on the other instances' GPUs; where that cannot be done, it keeps
    the device id Triton gave it. Either way the timings name the physical GPU."""
    from sdexport.serve import own_gpu

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    torch_ = _FakeTorch(count)
    assert own_gpu(1, environ=environ, modules=modules, load_torch=lambda: torch_) == want
    assert environ.get("CUDA_VISIBLE_DEVICES") == want_env and torch_.current == want[0]


def test_instances_share_the_cores(monkeypatch):
    import sdexport.bench as bench
    from sdexport.serve import instance_threads

    monkeypatch.setattr(bench, "usable_cores", lambda: 32)
    assert instance_threads({"instance_group": [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]}) == 16
    assert instance_threads({"instance_group": [{"count": 1, "kind": "KIND_CPU"}]}) is None  # one: libraries' own
    assert instance_threads({}) is None
    monkeypatch.setattr(bench, "usable_cores", lambda: 3)
    assert instance_threads({"instance_group": [{"count": 2, "gpus": [0, 1, 2, 3]}]}) == 1


def test_warmed_up_step_graphs_are_the_ones_requests_use(export_fp32, monkeypatch):
    """Each kind the warm-up captures is kept and is the one a request with the server's defaults uses, the
    scheduler named or left out: nothing is captured while serving. Before, the warm-up ran the model's own
    scheduler while clients named theirs, and 4 kinds were kept for up to --max-batch batch sizes, so a
    server captured while serving (on an H100: most of a second GPU's throughput)."""
    from sdexport import pipeline

    captured = []

    def capture(cls, pipe, sched, unet_timesteps, timesteps, latents, *rest):
        captured.append((type(sched).__name__, len(timesteps), tuple(latents.shape)))
        raise pipeline._NotCapturable("counted only")  # the eager loop runs, as where a capture fails

    monkeypatch.setattr(pipeline._StepGraphs, "capture", classmethod(capture))
    service = ImageService(export_fp32, scheduler="euler")
    service.pipe.step_graph = True  # on the CPU nothing is captured; the kinds are what is counted
    try:
        shapes = [(64, 96, n) for n in range(1, 5)] + [(96, 64, 1)]  # more kinds than MAX_STEP_GRAPH_KINDS
        assert len(shapes) > pipeline.MAX_STEP_GRAPH_KINDS
        service.warm_up(shapes, steps=2)
        assert len(captured) == len(shapes) and {c[:2] for c in captured} == {("EulerDiscreteScheduler", 2)}
        for h, w, n in shapes:
            for named in ({"scheduler": "euler"}, {}):
                per_image = {k: [v] * n for k, v in dict(steps=2, height=h, width=w, **named).items()}
                service.run([service.parse(tensors(prompt=["x"] * n, seed=list(range(n)), **per_image))])
        assert len(captured) == len(shapes), captured
        service.run([service.parse(tensors(prompt="x", steps=2, height=64, width=96, scheduler="ddim"))])
        assert captured[-1][0] == "DDIMScheduler" and len(captured) == len(shapes) + 1  # another kind: captured
        captured.clear()
        service.warm_up([(64, 64, 1)])  # no steps given: the default request's
        assert captured == [("EulerDiscreteScheduler", service.defaults["steps"], (1, 4, 8, 8))]
    finally:
        service.close()


def test_a_vae_that_pays_for_batch_changes_decodes_one_image_per_call(export_fp32, tmp_path, monkeypatch):
    """ONNX Runtime's CUDA convolutions search cuDNN again whenever the batch size changes (measured on an H100:
    640-840 ms for the sd15 VAE after a change, 9 ms per image repeated), and dynamic batching changes it on most
    calls: such a VAE decodes one image per call in serve. The images stay those of infer; on the CPU, where a
    change costs nothing, the VAE decodes the batch at once."""
    from sdexport.backends.ort import OrtEngine

    cpu = ImageService(export_fp32)
    try:
        assert cpu.pipe.engines["vae_decoder"].fixed_batch_preferred is False and cpu.pipe.vae_slicing is False
    finally:
        cpu.close()
    monkeypatch.setattr(OrtEngine, "fixed_batch_preferred", property(lambda self: True))
    service = ImageService(export_fp32)
    vae, batches = service.pipe.engines["vae_decoder"], []
    try:
        assert service.pipe.vae_slicing is True

        def recorded(feed):
            batches.append(feed["latent_sample"].shape[0])
            return vae(feed)

        service.pipe.engines["vae_decoder"] = recorded
        kw = dict(steps=2, guidance_scale=6.0, scheduler="euler", height=64, width=96)
        (served,) = service.run([service.parse(tensors(prompt=["a boat", "a cat", "a dog"], seed=[1, 2, 3],
                                                       **{k: [v] * 3 for k, v in kw.items()}))])
        assert served.error is None and batches == [1, 1, 1]
        for got, prompt, seed in zip(served.images, ["a boat", "a cat", "a dog"], [1, 2, 3]):
            want = infer_image(export_fp32, tmp_path, f"s{seed}", prompt=prompt, seed=seed, **kw)
            assert np.array_equal(got, want), f"seed {seed}: {(got != want).sum()} pixels differ"
    finally:
        service.pipe.engines["vae_decoder"] = vae
        service.close()


def test_only_dynamic_cuda_ort_engines_prefer_a_fixed_batch(export_fp32):
    from sdexport.backends.ort import OrtEngine
    from sdexport.components import Geometry
    from sdexport.runtime import ExportDir

    export = ExportDir.open(export_fp32)
    engine = OrtEngine(export, "vae_decoder")
    static = OrtEngine(export, "vae_decoder", static=Geometry(2, 64, 64))
    try:
        assert not engine.fixed_batch_preferred and not static.fixed_batch_preferred
        engine.cuda = static.cuda = True  # the rule itself: CUDA with dynamic shapes
        assert engine.fixed_batch_preferred and not static.fixed_batch_preferred
    finally:
        engine.cuda = static.cuda = False
        engine.close()
        static.close()


def test_serve_opens_onnx_runtime_engines_for_changing_batch_sizes(export_fp32):
    """serve's engines are told the batch size changes on most calls (on CUDA: cuDNN heuristics instead of a search
    at each change, measured 1.1 s per changed call for the sd15 UNet on an H100); infer's are not."""
    from sdexport.backends import load_engines
    from sdexport.backends.ort import OrtEngine, conv_algo_search

    assert conv_algo_search(True) == {"cudnn_conv_algo_search": "HEURISTIC"} and conv_algo_search(False) == {}
    service = ImageService(export_fp32)
    try:
        engines = [getattr(e, "inner", e) for e in service.pipe.engines.values()]
        assert engines and all(isinstance(e, OrtEngine) and e.batch_varies for e in engines)
    finally:
        service.close()
    infer = load_engines(export_fp32, "ort")
    try:
        assert all(not e.batch_varies for e in infer.values())
    finally:
        for e in infer.values():
            e.close()


def sdxl_tensors(n: int, **values) -> dict:
    """tensors() plus a family option per image: a pair (H W / TOP LEFT) as an INT32 row, a score as FP32."""
    out = tensors(prompt=[f"a lighthouse {i}" for i in range(n)], seed=list(range(1, n + 1)), steps=[2] * n,
                  guidance_scale=[5.0] * n, height=[128] * n, width=[64] * n, scheduler=["euler"] * n)
    for name, value in values.items():
        rows = value if isinstance(value, list) else [value] * n
        out[name] = np.array([list(v) if isinstance(v, tuple) else [v] for v in rows],
                             dtype=np.float32 if "score" in name else np.int32)
    return out


def test_sdxl_micro_conditioning_is_served_as_infer_takes_it(export_sdxl, tmp_path):
    """SDXL's request options (infer's --original-size, --crops-coords-top-left, --target-size and the negative
    pair) are inputs of the served model: each image equals infer with the same flags; images with other
    options run in another pipeline call (one call holds one set of time ids)."""
    from PIL import Image as PILImage

    from sdexport.runtime import ExportDir
    from sdexport.serve import inputs_for

    export = ExportDir.open(export_sdxl)
    fields = {f.name: f for f in inputs_for(export)}
    assert (fields["original_size"].datatype, fields["original_size"].dims) == ("INT32", (2,))
    assert "aesthetic_score" not in fields  # a refiner's option: not this model's
    service = ImageService(export_sdxl)
    try:
        given = dict(original_size=(256, 192), crops_coords_top_left=(8, 16), target_size=(128, 64))
        (served,) = service.run([service.parse(sdxl_tensors(2, **given))])
        assert served.error is None and [t["images_in_call"] for t in served.timings] == [2, 2]
        for seed, got in enumerate(served.images, start=1):
            out = tmp_path / f"x{seed}.png"
            result = run_cli("infer", export_sdxl, "-o", out, "--prompt", f"a lighthouse {seed - 1}", "--seed", seed,
                             "--steps", 2, "--guidance-scale", 5.0, "--height", 128, "--width", 64, "--scheduler",
                             "euler", "--original-size", 256, 192, "--crops-coords-top-left", 8, 16,
                             "--target-size", 128, 64)
            assert result.exit_code == 0, result.stderr
            want = np.asarray(PILImage.open(out))
            assert np.array_equal(got, want), f"seed {seed}: {(got != want).sum()} pixels differ"
        plain = service.run([service.parse(sdxl_tensors(1))])[0].images[0]
        assert not np.array_equal(plain, served.images[0])  # the options reached the UNet
        requests = [service.parse(sdxl_tensors(1, target_size=(128, 64))),
                    service.parse(sdxl_tensors(1, target_size=(64, 64))),
                    service.parse(sdxl_tensors(1, target_size=(128, 64)))]
        assert [len(g) for g in batch_groups(requests, 2)] == [2, 1]
    finally:
        service.close()


@pytest.mark.parametrize("values,field", [
    (dict(original_size=(32, 32)), "original_size"),
    (dict(original_size=(256, 192, 1)), "original_size: 2 value(s) per image expected"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
    (dict(negative_original_size=(256, 256)), "negative_original_size and negative_target_size: give both"),
])
def test_bad_sdxl_options_are_refused_naming_the_input(export_sdxl, values, field):
    from sdexport.runtime import ExportDir

    export = ExportDir.open(export_sdxl)
    with pytest.raises(SdexportError) as exc:
        parse_request(sdxl_tensors(1, **values), export, request_defaults())
    assert str(exc.value).startswith(field), str(exc.value)


def test_repository_inputs_are_the_models_own(export_fp32, export_sdxl, tmp_path):
    """config.pbtxt lists the request options of its model: SDXL's micro-conditioning as INT32 pairs; none for
    SD (Triton then refuses such an input by name)."""
    from sdexport.serve import ServeOptions, model_config
    from sdexport.runtime import ExportDir

    texts = {}
    for name, path in (("sd", export_fp32), ("sdxl", export_sdxl)):
        texts[name] = model_config(ServeOptions(str(path)).resolved(ExportDir.open(path)))
    assert "original_size" not in texts["sd"]
    assert re.search(r'name: "original_size" data_type: TYPE_INT32 dims: \[ 2 \] optional: true', texts["sdxl"])
    assert re.search(r'name: "negative_target_size" data_type: TYPE_INT32 dims: \[ 2 \] optional: true',
                     texts["sdxl"])


@pytest.mark.slow
def test_model_load_failure_is_one_error_line_with_its_exit_code(export_fp32, tmp_path):
    """The TensorRT backend on an export without engines: the model cannot load, and serve says why (the
    stub's own sdexport error and exit code), instead of a Triton log only."""
    http, grpc, metrics = free_ports(3)
    proc = subprocess.run(conftest.sdexport_cmd("serve", export_fp32, "--backend", "trt", "--http-port", http,
                                                "--grpc-port", grpc, "--metrics-port", metrics),
                          env=conftest.sdexport_env(), capture_output=True, text=True, timeout=STARTUP_S)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode in (5, 7, 8) and last.startswith("error: "), (proc.returncode, proc.stderr[-2000:])
    assert "ready:" not in proc.stdout


@pytest.mark.slow
def test_ctrl_c_before_ready_is_an_interrupt_not_a_drain_timeout(export_fp32, tmp_path):
    """Ctrl-C while the model still loads (a warm-up of 999 steps, the most tiny's PNDM schedule makes: minutes)
    stops Triton and is exit 130 with the interrupt's line: there is nothing in flight to drain (it said
    'in-flight requests were not answered within --drain-timeout-s', exit 11)."""
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(conftest.sdexport_cmd("serve", export_fp32, "--warmup", "128x128x4", "--warmup-steps",
                                                  "999", "--http-port", http, "--grpc-port", grpc,
                                                  "--metrics-port", metrics),
                            env=conftest.sdexport_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("starting tritonserver"):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted (SIGINT); nothing partial was left under a final name" in err.splitlines()
    assert "ready:" not in out and "in-flight" not in err


@pytest.mark.slow
def test_serve_with_a_lora_that_does_not_fit_is_exit_5(export_fp32, serve_lora, tmp_path):
    """The LoRA is switched while the model loads: one that does not fit is serve's exit 5, never 'ready'."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(serve_lora.read_bytes()[:300])
    http, grpc, metrics = free_ports(3)
    proc = subprocess.run(conftest.sdexport_cmd("serve", export_fp32, "--lora", broken, "--http-port", http,
                                                "--grpc-port", grpc, "--metrics-port", metrics),
                          env=conftest.sdexport_env(), capture_output=True, text=True, timeout=STARTUP_S)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 5 and last.startswith("error: ") and "not a LoRA this model can load" in last, \
        (proc.returncode, proc.stderr[-2000:])
    assert "ready:" not in proc.stdout


# --- the real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(export_fp32, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(export_fp32, log, "--max-batch", 4, "--max-queue-delay-ms", 300, "--max-queue-size", 6,
                 "--warmup", "64x64x2")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_equal_infer(server, export_fp32, tmp_path):
    """Four images in three concurrent requests (HTTP and gRPC) that send the same set of inputs (Triton
    batches only those): one execute call; the three that share steps run as one pipeline call."""
    same = dict(guidance_scale=6.0, height=64, width=96, scheduler="euler-a")
    calls = [lambda: request(server, tritonclient_http, prompt="a lighthouse", negative_prompt="", seed=1, steps=3,
                             **same),
             lambda: request(server, tritonclient_grpc, prompt=["a cat", "a lighthouse"], seed=[2, 3],
                             negative_prompt=["blurry", ""], steps=3, **same),
             lambda: request(server, tritonclient_http, prompt="a lighthouse", negative_prompt="", seed=4, steps=2,
                             **same)]
    results = fire(calls)
    for r in results:
        assert not isinstance(r, Exception), r
    assert [t["images_in_call"] for r in results for t in timings(r)] == [3, 3, 3, 1]
    assert results[1].as_numpy("image").shape == (2, 64, 96, 3)
    assert sum(t["text_cache_hits"] for r in results for t in timings(r)) >= 1  # "a lighthouse" and "" repeat
    defaults = request(server, tritonclient_http, prompt="a lighthouse", seed=5).as_numpy("image")

    want = [infer_image(export_fp32, tmp_path, "a", prompt="a lighthouse", seed=1, steps=3, **same),
            infer_image(export_fp32, tmp_path, "b", prompt="a cat", seed=2, negative_prompt="blurry", steps=3,
                        **same),
            infer_image(export_fp32, tmp_path, "c", prompt="a lighthouse", seed=3, steps=3, **same),
            infer_image(export_fp32, tmp_path, "d", prompt="a lighthouse", seed=4, steps=2, **same),
            infer_image(export_fp32, tmp_path, "e", prompt="a lighthouse", seed=5)]  # infer's defaults
    got = [results[0].as_numpy("image")[0], *results[1].as_numpy("image"), results[2].as_numpy("image")[0],
           defaults[0]]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.uint8 and g.shape == w.shape and np.array_equal(g, w), \
            f"image {i}: {(g != w).sum()} pixels differ"
    assert got[4].shape == (128, 128, 3)  # the tiny preset's native size
    assert not np.array_equal(got[0], got[2])  # same prompt, other seed


@pytest.mark.slow
def test_bad_requests_get_client_errors_and_the_server_keeps_serving(server):
    http = server.http_client()
    import tritonclient.http as h

    def raw(name, datatype, value, shape=(1, 1)):
        t = h.InferInput(name, list(shape), datatype)
        t.set_data_from_numpy(np.array(value, dtype={"BYTES": object, "INT32": np.int32, "FP32": np.float32,
                                                     "INT64": np.int64}[datatype]).reshape(shape))
        return t

    prompt = raw("prompt", "BYTES", [[b"x"]])
    cases = [([prompt, raw("scheduler", "BYTES", [[b"heun"]])], "scheduler"),
             ([prompt, raw("height", "INT32", [[1024]])], "height 1024"),
             ([prompt, raw("steps", "INT32", [[0]])], "steps"),
             ([prompt, raw("guidance_scale", "FP32", [[float("nan")]])], "guidance_scale"),
             ([raw("prompt", "INT32", [[5]])], "'prompt'"),  # Triton checks the datatype: names the input
             ([raw("seed", "INT64", [[5]])], "prompt: missing"),
             ([prompt, raw("seed", "FP32", [[1.0]])], "'seed'"),
             ([prompt, raw("steps", "INT32", [[1000]])], "steps 1000: scheduler PNDMScheduler cannot run"),
             ([raw("prompt", "BYTES", [[b"word " * 400_000]])], "prompt: 2,000,000 characters; at most 16,384")]
    for inputs, needle in cases:
        with pytest.raises(InferenceServerException) as exc:
            http.infer(MODEL, inputs)
        assert exc.value.status() == "400" and needle in exc.value.message(), exc.value.message()
    # a bad request batched with good ones fails alone
    results = fire([lambda: request(server, tritonclient_http, prompt="ok", steps=1, height=64, width=64),
                    lambda: request(server, tritonclient_http, prompt="bad", steps=1, scheduler="nope")])
    assert results[0].as_numpy("image").shape == (1, 64, 64, 3)
    assert isinstance(results[1], InferenceServerException) and "scheduler" in results[1].message()
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)


@pytest.mark.slow
def test_full_queue_rejects_with_an_overload_error(server):
    # steps 20: the first batch computes long enough for the 16 requests to arrive while it does, also on a
    # busy CI machine (with 6, a run beside another test process saw every request answered)
    results = fire([lambda i=i: request(server, tritonclient_http, prompt=f"p{i}", seed=i, steps=20, height=64,
                                        width=64) for i in range(16)])
    rejected = [r for r in results if isinstance(r, Exception)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert len(answered) >= 4 and len(rejected) >= 6, (len(answered), [str(r) for r in rejected])
    for r in rejected:
        assert r.status() == "503" and "Exceeds maximum queue size" in r.message(), r.message()


@pytest.mark.slow
def test_health_and_prometheus_metrics(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}{path}", timeout=10) as resp:
            assert resp.status == 200
    names = ("sdexport_images_total", "sdexport_pipeline_calls_total", "sdexport_text_cache_hits_total",
             "sdexport_text_cache_misses_total", "nv_inference_request_success")
    before = {name: server.metric(name) for name in names}
    for seed in (1, 2):  # the second request's prompt and negative prompt (new to this server) are cached
        request(server, tritonclient_http, prompt="metrics, once more", negative_prompt="metrics, negative",
                seed=seed, steps=1, height=64, width=64)
    after = {name: server.metric(name) for name in names}
    assert {name: after[name] - before[name] for name in names} == {
        "sdexport_images_total": 2, "sdexport_pipeline_calls_total": 2, "sdexport_text_cache_hits_total": 2,
        "sdexport_text_cache_misses_total": 2, "nv_inference_request_success": 2}


def _stubs_of(pid: int) -> list[int]:
    from sdexport.serve import _stub_pids

    tritons = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
               if p.read_text().rsplit(")", 1)[1].split()[1] == str(pid)]
    return [s for t in tritons for s in _stub_pids(t)]


@pytest.mark.slow
def test_readme_examples_against_the_server(server, tmp_path):
    """The README's curl and tritonclient examples as a new user pastes them (the port aside)."""
    import shutil

    from PIL import Image

    url = f"localhost:{server.http}"
    run = subprocess.run([sys.executable, "-c", CLIENT_EXAMPLE.replace("localhost:8000", url)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["images_in_call"] == 1
    first = np.asarray(Image.open(tmp_path / "image.png"))
    assert first.shape == (128, 128, 3)
    if shutil.which("curl"):
        (tmp_path / "image.png").unlink()
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        run = subprocess.run(["bash", "-c", CURL_EXAMPLE.replace("localhost:8000", url)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert np.array_equal(np.asarray(Image.open(tmp_path / "image.png")), first)  # same seed, same image


@pytest.mark.slow
def test_killed_instance_is_reloaded_and_sigterm_answers_in_flight_requests(export_fp32, tmp_path):
    """A server of its own (it ends it). A crash that kills the instance's process (here SIGKILL) fails the
    requests it had, and the supervisor reloads the model: the server answers again without a restart, after
    each of three deaths in a row, with one warning per death. Then
    three requests wait in the batcher's 300 ms window (pending in Triton's metrics) when SIGTERM comes: all
    three are answered and the server exits 0, also with the crashed instance's remains in Triton."""
    server = Server(export_fp32, tmp_path / "server.log", "--max-batch", 4, "--max-queue-delay-ms", 300,
                    "--warmup", "64x64")
    try:
        for death in range(1, 4):  # every death is recovered, not only the first (each reload loads again)
            (stub,) = _stubs_of(server.proc.pid)
            os.kill(stub, signal.SIGKILL)
            http = server.http_client()
            deadline = time.monotonic() + STARTUP_S
            while True:  # each try is a real request; the failures before the reload are errors, not hangs
                try:
                    result = request(http, tritonclient_http, prompt="after", steps=1, height=64, width=64)
                    break
                except InferenceServerException as exc:
                    assert time.monotonic() < deadline, f"death {death}: {exc.message()}"
                    time.sleep(0.2)
            http.close()
            assert result.as_numpy("image").shape == (1, 64, 64, 3)
            assert _stubs_of(server.proc.pid) and stub not in _stubs_of(server.proc.pid)
            time.sleep(1.5)  # a few supervisor rounds: a warning repeated while nothing died would show here
            assert server.log.read_text().count("reloading the model") == death, server.log_tail()

        results: list = [None] * 3

        def send(i):
            try:
                results[i] = request(server, tritonclient_http, prompt=f"drain {i}", seed=i, steps=8, height=64,
                                     width=64).as_numpy("image").shape
            except Exception as exc:  # noqa: BLE001 -- asserted below
                results[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while server.metric("nv_inference_pending_request_count") < 3:
            assert time.monotonic() < deadline, "requests never pending"
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert results == [(1, 64, 64, 3)] * 3, results
        assert server.proc.wait(timeout=60) == 0, server.log_tail()
        assert "stopped: in-flight requests answered" in server.log.read_text()
    finally:
        server.stop()


def _start_time(pid: int) -> str:
    """/proc/PID/stat's starttime (field 22), read here independently of sdexport.serve."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _fabricated_work_dir(tmp: Path, name: str, processes, namespace: str | None = None, owner: bool = True) -> Path:
    work = tmp / f"sdexport-serve-{name}"
    (work / "models").mkdir(parents=True)
    if owner:
        (work / "owner.json").write_text(json.dumps({
            "processes": processes, "shm_prefix": f"sdexport_{processes[0][0]}_0a1b2c3d_",
            "pid_namespace": namespace if namespace is not None else os.readlink("/proc/self/ns/pid")}))
    return work


def test_stale_work_dirs_are_removed_and_live_ones_kept(tmp_path):
    """The work directories of serve runs whose processes are all gone are removed (with their /dev/shm
    regions); any whose recorded process still runs (same pid and start time), that record none, or that were
    written in another pid namespace are kept."""
    from sdexport.serve import remove_stale_work_dirs

    gone = subprocess.Popen(["sleep", "60"])
    gone_start = _start_time(gone.pid)
    gone.kill()
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        me = [os.getpid(), _start_time(os.getpid())]
        dead = _fabricated_work_dir(tmp_path, "dead", [[gone.pid, gone_start]])
        reused = _fabricated_work_dir(tmp_path, "reused", [[os.getpid(), "1"]])  # this pid, another process's start
        both_dead = _fabricated_work_dir(tmp_path, "both", [[gone.pid, gone_start], [os.getpid(), "1"]])
        live = _fabricated_work_dir(tmp_path, "live", [[alive.pid, _start_time(alive.pid)]])
        triton_live = _fabricated_work_dir(tmp_path, "triton", [[gone.pid, gone_start], me])  # Triton still draining
        no_owner = _fabricated_work_dir(tmp_path, "older", [], owner=False)
        elsewhere = _fabricated_work_dir(tmp_path, "container", [[gone.pid, gone_start]], namespace="pid:[1]")
        other = tmp_path / "unrelated"
        other.mkdir()
        region = Path(f"/dev/shm/sdexport_{gone.pid}_0a1b2c3d_region")
        region.write_bytes(b"x")
        said: list[str] = []
        removed = remove_stale_work_dirs(said.append, tmp_path)
        assert sorted(removed) == sorted([dead, reused, both_dead])
        assert not dead.exists() and not reused.exists() and not both_dead.exists() and not region.exists()
        assert all(p.is_dir() for p in (live, triton_live, no_owner, elsewhere, other))
        assert len(said) == 3 and f"removed {dead}" in "\n".join(said)
    finally:
        alive.kill()
        alive.wait()
        Path(f"/dev/shm/sdexport_{gone.pid}_0a1b2c3d_region").unlink(missing_ok=True)


@pytest.mark.slow
def test_the_work_dir_of_a_server_killed_with_sigkill_is_removed_by_the_next(export_fp32, tmp_path):
    """`kill -9` of the supervisor leaves its work directory (its own cleanup never runs); the next `sdexport
    serve` removes it before starting, and keeps a live server's."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = Server(export_fp32, tmp_path / "first.log", "--warmup", "64x64", env={"TMPDIR": tmp})
    try:
        (work,) = tmp.glob("sdexport-serve-*")
        triton = [pid for pid, _ in json.loads((work / "owner.json").read_text())["processes"]][1]
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    deadline = time.monotonic() + 120  # Triton got SIGTERM (parent death signal) and drains by itself
    while True:
        try:
            if Path(f"/proc/{triton}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        assert time.monotonic() < deadline, "tritonserver still running"
        time.sleep(0.2)
    assert work.is_dir()
    live = _fabricated_work_dir(tmp, "live", [[os.getpid(), _start_time(os.getpid())]])
    second = Server(export_fp32, tmp_path / "second.log", "--warmup", "64x64", env={"TMPDIR": tmp})
    try:
        assert not work.exists(), second.log_tail()
        assert f"removed {work}" in second.log.read_text()
        assert live.is_dir()
    finally:
        second.stop()
    assert sorted(tmp.glob("sdexport-serve-*")) == [live]


@pytest.mark.slow
def test_server_with_a_lora_answers_image_requests_as_infer(export_fp32, serve_lora, tmp_path):
    """A server started with --lora, an image-to-image request over HTTP and gRPC (the image as PNG bytes): the
    pixels of `infer --lora --image` with the same settings; a request with bytes that are no image: 400."""
    server = Server(export_fp32, tmp_path / "server.log", "--lora", f"{serve_lora}:0.8", "--warmup", "64x64")
    try:
        image = png_bytes(64, 96, seed=9)
        (tmp_path / "in.png").write_bytes(image)
        kw = dict(prompt="a kite", seed=4, steps=3, strength=0.6)
        want = infer_image(export_fp32, tmp_path, "want", image=tmp_path / "in.png", lora=f"{serve_lora}:0.8", **kw)
        for module in (tritonclient_http, tritonclient_grpc):
            got = request(server, module, image=image, **kw).as_numpy("image")
            assert got.shape == (1, 64, 96, 3) and np.array_equal(got[0], want), module.__name__
        with pytest.raises(InferenceServerException) as exc:
            request(server, tritonclient_http, prompt="x", image=b"no image")
        assert exc.value.status() == "400" and "image: not an image" in exc.value.message(), exc.value.message()
        assert "LoRA style.safetensors:0.8" in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_server_with_the_int8_unet_answers_as_infer_unet_int8(int8_export, tmp_path):
    """`serve --unet int8` on an export made by `sdexport quantize`: over HTTP and gRPC the image is `infer
    --unet int8`'s for the same seed (and not the FP32 UNet's); the start line, the model's config and each
    image's timings say which UNet is served."""
    server = Server(int8_export, tmp_path / "server.log", "--unet", "int8", "--warmup", "64x64")
    try:
        kw = dict(prompt="a teapot", seed=2, steps=3, height=64, width=64)
        want = infer_image(int8_export, tmp_path, "want", unet="int8", **kw)
        assert not np.array_equal(want, infer_image(int8_export, tmp_path, "fp32", **kw))
        for module in (tritonclient_http, tritonclient_grpc):
            result = request(server, module, **kw)
            got = result.as_numpy("image")
            assert got.shape == (1, 64, 64, 3) and np.array_equal(got[0], want), module.__name__
            assert timings(result)[0]["unet"] == "int8"
        config = server.http_client().get_model_config(MODEL)
        assert config["parameters"]["unet"] == {"string_value": "int8"}, config["parameters"]
        assert "INT8 UNet" in server.log.read_text().split("starting tritonserver:", 1)[1].splitlines()[0]
    finally:
        server.stop()


# --- the repository under the plain tritonserver ------------------------------------------------------------

@pytest.mark.slow
def test_sdxl_server_takes_micro_conditioning_and_refuses_what_the_model_lacks(export_sdxl, tmp_path):
    """An SDXL export served for real: tritonclient sends original_size / target_size as INT32 pairs and the
    image equals infer's with the same flags; an input the model does not take (the refiner's aesthetic score)
    is Triton's 400 naming it, and the server keeps serving."""
    from PIL import Image

    srv = Server(export_sdxl, tmp_path / "server.log", "--warmup", "128x64x1", "--warmup-steps", 2)
    try:
        client = srv.http_client()
        values = dict(prompt="a lighthouse", seed=4, steps=2, guidance_scale=5.0, height=128, width=64,
                      scheduler="euler", original_size=(256, 192), target_size=(128, 64))
        result = client.infer(MODEL, client_inputs(tritonclient_http, **values))
        out = tmp_path / "infer.png"
        cli = run_cli("infer", export_sdxl, "-o", out, "--prompt", "a lighthouse", "--seed", 4, "--steps", 2,
                      "--guidance-scale", 5.0, "--height", 128, "--width", 64, "--scheduler", "euler",
                      "--original-size", 256, 192, "--target-size", 128, 64)
        assert cli.exit_code == 0, cli.stderr
        got, want = result.as_numpy("image")[0], np.asarray(Image.open(out))
        assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ"
        with pytest.raises(InferenceServerException) as exc:
            client.infer(MODEL, client_inputs(tritonclient_http, prompt="x", aesthetic_score=6.0))
        assert "aesthetic_score" in str(exc.value), str(exc.value)
        # an option of the wrong datatype or shape, over either protocol: a 400 naming it
        for module, c in ((tritonclient_http, client), (tritonclient_grpc, srv.grpc_client())):
            for data, datatype in ((np.array([[256.0, 192.0]], np.float32), "FP32"),
                                   (np.array([[256, 192, 1]], np.int32), "INT32")):
                tensor = module.InferInput("original_size", list(data.shape), datatype)
                tensor.set_data_from_numpy(data)
                with pytest.raises(InferenceServerException) as exc:
                    c.infer(MODEL, client_inputs(module, prompt="x", height=128, width=64) + [tensor])
                assert "original_size" in str(exc.value), str(exc.value)
        again = client.infer(MODEL, client_inputs(tritonclient_http, **values)).as_numpy("image")[0]
        assert np.array_equal(again, want)
    finally:
        srv.stop()


def test_load_report_takes_calls_without_some_stage_times():
    """serve_load keeps the stage times a server's responses carry; its stage table uses the calls that carry the
    ones it shows (a server whose timings lack one: no KeyError that would end the run after its first level)."""
    from serve_load import markdown, stage_split

    full = {"device": "cpu", "images_in_call": 2, "total_ms": 100.0, "unet_total_ms": 60.0, "vae_decoder_ms": 20.0,
            "text_encoder_ms": 10.0, "other_ms": 10.0}
    partial = {k: v for k, v in full.items() if k != "other_ms"} | {"total_ms": 90.0}
    split = stage_split([full, full, partial])
    assert split["calls"] == 1 and split["unet_ms_per_image"] == 30.0 and split["vae_share"] == 0.2
    assert stage_split([partial]) is None
    level = {"concurrency": 1, "requests": 1, "errors": 0, "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0},
             "images_per_second": 1.0, "mean_images_per_call": 1.0, "server_pipeline_ms_p50": 1.0,
             "outside_pipeline_ms_p50": 0.0, "requests_detail": [partial]}
    result = {"machine": {}, "settings": {"export": "e", "backend": "ort", "steps": 1, "guidance_scale": 1.0,
                                          "protocol": "http", "requests_per_client": 1},
              "date": "d", "commit": "c", "command": "x", "baselines": {}, "targets": {},
              "runs": [{"label": "cpu", "levels": [level]}]}
    assert "| 1 | 1 | 0 |" in markdown(result) and "Where each call's time went" not in markdown(result)
    level["requests_detail"].append(full)
    assert "| 1 | 1 | 30.0 | 10.0 | 10.0 | 10.0 | 20% |" in markdown(result)


@pytest.mark.slow
def test_written_repository_runs_under_the_bundled_tritonserver(export_fp32, tmp_path):
    """What the official container does with the repository (tritonserver --model-repository DIR, the Python
    backend in its backend directory), by the README's recipe for the wheel's binary, run in a shell as written:
    only the export, the ports and this checkout's sdexport (for the CLI and for model.py) are the test's. Its
    image equals infer's, a bad request is a 400 naming the field, and SIGTERM ends it with exit 0."""
    import shlex

    from pytriton.utils.distribution import get_root_module_path

    http, grpc, metrics = free_ports(3)
    sdexport = shlex.join(conftest.sdexport_cmd("serve", export_fp32, "--warmup", "64x64"))
    script = TRITONSERVER_EXAMPLE.replace("sdexport serve engines/tiny", sdexport, 1)
    assert script != TRITONSERVER_EXAMPLE and script.rstrip().endswith('"$PWD/backends"')
    script += f" --http-port={http} --grpc-port={grpc} --metrics-port={metrics} --allow-gpu-metrics=false"
    env = conftest.sdexport_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                SDEXPORT_PYTHONPATH=conftest.REPO_ROOT)
    env.pop("LD_LIBRARY_PATH", None)  # the recipe's own, not this session's
    log = tmp_path / "tritonserver.log"
    shell = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT)
    binary = get_root_module_path() / "tritonserver" / "bin" / "tritonserver"

    def tritonserver() -> int | None:
        """The recipe's tritonserver: the shell itself where bash ran its last command in place, else its child."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, parent = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if shell.pid in (pid, parent) and Path(stat.parent, "exe").resolve() == binary.resolve():
                    return pid
            except (OSError, IndexError, ValueError):  # a process that ended meanwhile
                continue
        return None

    try:
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=300)
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 -- not listening yet
                pass
            assert shell.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        assert (tmp_path / "models" / MODEL / "config.pbtxt").is_file()
        kw = dict(prompt="a quiet harbour", seed=5, steps=2, height=64, width=64)
        got = request(client, tritonclient_http, **kw).as_numpy("image")[0]
        assert np.array_equal(got, infer_image(export_fp32, tmp_path, "repo", **kw))
        with pytest.raises(InferenceServerException, match="steps"):
            request(client, tritonclient_http, prompt="x", steps=0)
        client.close()  # plain Triton waits for open client connections before it exits
        pid = tritonserver()
        assert pid is not None, log.read_text()[-3000:]
        os.kill(pid, signal.SIGTERM)
        assert shell.wait(timeout=60) == 0, log.read_text()[-3000:]  # the shell's status is tritonserver's
    finally:
        if shell.poll() is None:
            pid = tritonserver()
            if pid is not None and pid != shell.pid:
                os.kill(pid, signal.SIGKILL)
            shell.kill()
            shell.wait()


@pytest.mark.slow
def test_load_generator_smoke(server, export_fp32, tmp_path):
    """benchmarks/serve_load.py end to end on the CPU (the CI smoke level), against the module's server: the
    bench baseline, two concurrency levels, JSON and Markdown with the run's provenance."""
    out = tmp_path / "load"
    args = [export_fp32, "--url", f"127.0.0.1:{server.http}", "--steps", 1, "--size", 64, "--concurrency", "1,2",
            "--requests-per-client", 2, "--bench-runs", 1, "--compare-concurrency", 1, "--out", out,
            "--time-limit-s", 300]
    run = subprocess.run([sys.executable, str(conftest.REPO_ROOT / "benchmarks" / "serve_load.py"), *map(str, args)],
                         capture_output=True, text=True, timeout=600, env=conftest.sdexport_env())
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "serve_load.json").read_text())
    for key in ("machine", "versions", "commit", "command"):
        assert result[key], key
    (srv,) = result["runs"]
    assert [lvl["concurrency"] for lvl in srv["levels"]] == [1, 2]
    for lvl in srv["levels"]:
        assert lvl["requests"] == 2 * lvl["concurrency"] and lvl["errors"] == 0 and lvl["complete"]
        la = lvl["latency_ms"]
        assert 0 < la["p50"] <= la["p90"] <= la["p99"] and lvl["images_per_second"] > 0
    assert result["baselines"]["1"]["pipeline_total_ms"] > 0
    assert set(result["targets"]) == {"c1_added_latency", "c1_throughput_vs_bench"}
    assert "| 1 | 2 | 0 |" in (out / "serve_load.md").read_text()
    for lvl in srv["levels"]:  # one instance (the CPU): its own pipeline time per image
        (device,) = lvl["per_device"]
        assert device == "cpu" and lvl["per_device"][device]["requests"] == lvl["requests"]
        assert lvl["per_device"][device]["pipeline_ms_per_image_p50"] > 0
        # each request's call: the stage times that found session 6's VAE switch cost
        assert len(lvl["requests_detail"]) == lvl["requests"]
        for r in lvl["requests_detail"]:
            assert r["total_ms"] >= r["unet_total_ms"] + r["vae_decoder_ms"] > 0 and r["images_in_call"] >= 1
    assert "Where each call's time went" in (out / "serve_load.md").read_text()


def test_client_inputs_take_a_pair_for_every_image_or_one_per_image():
    import tritonclient.http as http

    for value, n in (((256, 192), 1), ([256, 192], 1), ([(256, 192), (128, 64)], 2), ([[1, 2], [3, 4]], 2)):
        shapes = {i.name(): i.shape() for i in client_inputs(http, prompt="x", original_size=value)}
        assert shapes == {"prompt": [n, 1], "original_size": [n, 2]}, (value, shapes)
