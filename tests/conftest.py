"""Fixtures built once per test run: the tiny preset, a model the project did not write, and exports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdexport.models import write_preset

    return write_preset("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    """A diffusers SD directory written with diffusers alone, shaped unlike the presets:
    6 latent channels, 3 UNet levels (latent multiple 4), VAE scale factor 4, cross-attention
    width 48, native 96 px, v-prediction DDIM scheduler, SD 2.x-style linear projections."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdexport.models import build_tokenizer

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=24, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        attention_head_dim=(4, 8, 8), norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=6, layers_per_block=1,
                        block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=96,
                        scaling_factor=0.5)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = tmp_path_factory.mktemp("models") / "other"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sdxl_tiny_model(tmp_path_factory) -> Path:
    from sdexport.models import write_preset

    return write_preset("sdxl-tiny", tmp_path_factory.mktemp("models") / "sdxl-tiny")


# --- small SDXL modules written with diffusers alone (tests/test_sdxl*.py) -----------------------------------
def small_sdxl_text_encoders(hidden=(24, 40), layers=(2, 3), projection=16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=hidden[0], intermediate_size=2 * hidden[0],
                                      num_hidden_layers=layers[0], num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden[1], intermediate_size=2 * hidden[1], num_hidden_layers=layers[1],
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=projection,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    return te, te2


def small_sdxl_unet(cross, pooled, time_ids, time_dim=4, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=20, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + time_ids * time_dim, norm_num_groups=8, **extra)


def small_vae(force_upcast):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=80,
                         scaling_factor=0.5, force_upcast=force_upcast)


@pytest.fixture(scope="session")
def refiner(tmp_path_factory) -> Path:
    """An SDXL refiner: StableDiffusionXLImg2ImgPipeline with only text_encoder_2, aesthetic-score conditioning
    (5 time ids), force_zeros_for_empty_prompt off, as the real refiner's model_index.json has it; VAE factor 4,
    native 80 px."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from sdexport.models import build_tokenizer

    torch.manual_seed(6)
    _, te2 = small_sdxl_text_encoders()
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=small_vae(True), text_encoder=None, text_encoder_2=te2, tokenizer=None,
        tokenizer_2=build_tokenizer(pad_token="!"), unet=small_sdxl_unet(40, 16, 5),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    out = tmp_path_factory.mktemp("models") / "refiner"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def export_refiner(refiner, tmp_path_factory) -> Path:
    return _export(refiner, tmp_path_factory.mktemp("exports") / "refiner", max_images=2)


@pytest.fixture(scope="session")
def inpaint_model(tmp_path_factory) -> Path:
    """An inpainting model (UNet with 9 input channels: latents, mask, masked-image latents) written with
    diffusers' StableDiffusionInpaintPipeline alone, tiny-sized."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdexport.models import PRESETS, SD15_SCHEDULER, build_tokenizer

    tiny = PRESETS["tiny"]
    torch.manual_seed(3)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL(**tiny.vae), text_encoder=CLIPTextModel(CLIPTextConfig(**tiny.text_encoder)),
        tokenizer=build_tokenizer(), unet=UNet2DConditionModel(**{**tiny.unet, "in_channels": 9}),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    out = tmp_path_factory.mktemp("models") / "inpaint"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def export_inpaint(inpaint_model, tmp_path_factory) -> Path:
    return _export(inpaint_model, tmp_path_factory.mktemp("exports") / "inpaint-fp32", max_images=2)


@pytest.fixture
def model(tiny_model, tmp_path):
    """A private copy of the tiny preset (a command that wrongly wrote into it must not spoil the session's)."""
    return shutil.copytree(tiny_model, tmp_path / "model")


@pytest.fixture
def export(export_fp32, tmp_path):
    """A private copy of the tiny FP32 export, for commands that may (wrongly) change it."""
    return shutil.copytree(export_fp32, tmp_path / "export")


def _export(src: Path, out: Path, **kw) -> Path:
    from sdexport.export import export

    export(str(src), out, **kw)
    return out


@pytest.fixture(scope="session")
def export_fp32(tiny_model, tmp_path_factory) -> Path:
    return _export(tiny_model, tmp_path_factory.mktemp("exports") / "tiny-fp32")


@pytest.fixture(scope="session")
def export_fp16(tiny_model, tmp_path_factory) -> Path:
    return _export(tiny_model, tmp_path_factory.mktemp("exports") / "tiny-fp16", dtype="fp16")


@pytest.fixture(scope="session")
def export_other(other_model, tmp_path_factory) -> Path:
    return _export(other_model, tmp_path_factory.mktemp("exports") / "other-fp32", max_images=2)


@pytest.fixture(scope="session")
def trt():
    """tensorrt_rtx, which builds without a GPU. In CI (CI=true) its absence fails the tests."""
    try:
        import tensorrt_rtx
    except ImportError:
        msg = "tensorrt_rtx is not installed: pip install tensorrt-rtx-cu13==1.7.1.116 (make install does)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI: {msg}")
        pytest.skip(msg)
    return tensorrt_rtx


def copy_export(src: Path, dst: Path, with_engines: bool = True) -> Path:
    """A copy of an export directory (without engines: also none in its manifest)."""
    shutil.copytree(src, dst, ignore=None if with_engines else shutil.ignore_patterns("engines"))
    if not with_engines:
        data = json.loads((dst / "manifest.json").read_text())
        data["engines"] = {}
        (dst / "manifest.json").write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="session")
def built(trt, export_fp16, tmp_path_factory):
    """The tiny fp16 export with all four engines (TensorRT-RTX, default targets), built once per run
    (read-only: copy it to change it). Returns (directory, build report, build messages)."""
    from sdexport.build import build

    out = copy_export(export_fp16, tmp_path_factory.mktemp("engines") / "tiny-fp16", with_engines=False)
    messages: list[str] = []
    report = build(out, precision="fp16", say=messages.append)
    return out, report, messages


@pytest.fixture(scope="session")
def export_sdxl(sdxl_tiny_model, tmp_path_factory) -> Path:
    """The sdxl-tiny preset, FP32, every component (64-192 px, up to 2 images per call)."""
    return _export(sdxl_tiny_model, tmp_path_factory.mktemp("exports") / "sdxl-fp32", max_images=2)


def load_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def run_cli(*args):
    """Invoke the sdexport CLI in-process; our SystemExit codes come back as result.exit_code."""
    from click.testing import CliRunner

    from sdexport.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_error(result, code, *needles, only_line=False):
    """Exit ``code``, no traceback, and a last stderr line ``error: ...`` naming every needle.
    ``only_line``: the error is all of stderr (commands that print no progress first)."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    if only_line:
        assert err.count("\n") == 0, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, last


REPO_ROOT = Path(__file__).resolve().parent.parent


def sdexport_cmd(*args) -> list[str]:
    """argv that runs this checkout's sdexport CLI in a subprocess (``python -m sdexport``)."""
    import sys

    return [sys.executable, "-m", "sdexport", *[str(a) for a in args]]


def sdexport_env(**extra) -> dict[str, str]:
    """Environment for such a subprocess: this checkout first on PYTHONPATH, quiet libraries."""
    # the caller's own PYTHONPATH stays after the checkout (a GPU host's packages may live only there)
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- the real CLI in a subprocess (tests/test_reliability_*.py) -------------------------------------------
def cli(*args, timeout: float = 300, env: dict | None = None, **kwargs):
    """Run this checkout's sdexport CLI in a subprocess; returns the CompletedProcess (text output).
    A preset cache of the test session's own (``SDEXPORT_CACHE``) keeps presets out of the user's cache."""
    import subprocess

    return subprocess.run(sdexport_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=sdexport_env(**(env or {})), errors="surrogateescape", **kwargs)


def assert_refused(proc, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, exactly one ``error: `` line on stderr, last, naming every needle.
    Returns that line."""
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


LOCK_NAMES = (".sdexport.lock",)  # sdexport.manifest.LOCK_NAME


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (links followed), and '<dir>' for directories:
    what must stay byte-identical when a command is refused."""
    import hashlib

    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name in LOCK_NAMES:  # the export lock's file: every reader and writer rewrites it
            continue
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (``mount_tmpfs(size='4m', nr_inodes=None)`` -> its path); skips where the machine
    does not allow mounting one (not root, or no mount privilege in this container). Unmounted afterwards."""
    import shutil
    import subprocess

    mounted = []

    def mount(size: str = "4m", nr_inodes: int | None = None) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="session")
def preset_cache(tmp_path_factory) -> Path:
    """SDEXPORT_CACHE for subprocesses: a session-private preset cache."""
    return tmp_path_factory.mktemp("preset-cache")
def tensorrt_form_problems(path: Path) -> tuple[dict[str, int], list]:
    """The forms TensorRT's fused attention and NVIDIA's diffusion demo expect, read from an ONNX file:
    each Softmax is Mul(Q), Mul(K) -> MatMul -> Cast to FP32 (-> mask Add) -> Softmax (FP32) -> Cast -> MatMul;
    Resize input, scales and output are FP32; normalization input, scale and bias are FP32; no ConvTranspose.
    Returns (counts of the checked op types, the nodes that break a rule)."""
    import collections

    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    typed = onnx.shape_inference.infer_shapes(model).graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    dtype.update({i.name: i.data_type for i in model.graph.initializer})
    made_by = {o: n for n in model.graph.node for o in n.output}
    read_by = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            read_by[i].append(n)
    fp32 = TensorProto.FLOAT
    problems = []
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
            tensors = [t for t in n.input if t] + list(n.output)
        elif n.op_type == "Resize":
            tensors = [n.input[0], n.output[0]] + ([n.input[2]] if len(n.input) > 2 and n.input[2] else [])
        else:
            tensors = []
        if any(dtype.get(t) != fp32 for t in tensors):
            problems.append((n.op_type, n.name, [dtype.get(t) for t in tensors]))
        if n.op_type == "ConvTranspose":
            problems.append((n.op_type, n.name))
        if n.op_type == "Softmax":
            up = made_by[n.input[0]]
            up = made_by[up.input[0]] if up.op_type == "Add" else up
            scores = made_by.get(up.input[0]) if up.op_type == "Cast" else None
            after = read_by[n.output[0]]
            ok = (scores is not None and scores.op_type == "MatMul"
                  and all(made_by[i].op_type == "Mul" for i in scores.input) and dtype[n.output[0]] == fp32
                  and len(after) == 1 and after[0].op_type == "Cast"
                  and [c.op_type for c in read_by[after[0].output[0]]] == ["MatMul"])
            if not ok:
                problems.append((n.op_type, n.name))
    counts = collections.Counter(n.op_type for n in model.graph.node
                                 if n.op_type in ("Softmax", "Resize", "LayerNormalization", "InstanceNormalization"))
    return dict(counts), problems


# --- LoRA parity with diffusers (tests/test_lora.py, tests/test_sdxl_lora.py) ------------------------------
LORA_REQUEST = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=3, guidance_scale=6.0, seed=21,
                    scheduler="euler", height=64, width=96)


def diffusers_lora_images(pipeline: str, model, loras, load_kwargs=None, **kw):
    """diffusers' ``pipeline`` (a class name: StableDiffusionPipeline, StableDiffusionXLPipeline) with ``loras``
    [(file, scale)] loaded, weighted and fused into every part its loader takes, run on request ``kw``."""
    import diffusers
    import torch

    from sdexport.pipeline import make_scheduler

    pipe = getattr(diffusers, pipeline).from_pretrained(model, **(load_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])
        pipe.fuse_lora(components=[p for p in pipe._lora_loadable_modules if getattr(pipe, p, None) is not None],
                       adapter_names=names)
    pipe.scheduler = make_scheduler(kw["scheduler"], pipe.scheduler.config)
    return pipe(kw["prompt"], negative_prompt=kw["negative_prompt"], num_inference_steps=kw["steps"],
                guidance_scale=kw["guidance_scale"], generator=torch.Generator("cpu").manual_seed(kw["seed"]),
                height=kw["height"], width=kw["width"], output_type="np").images


def lora_references(pipeline: str, model, loras: dict, load_kwargs=None):
    """``image(*state)``: diffusers' image of LORA_REQUEST with the LoRAs of ``state`` ((name in ``loras``,
    scale), ...), each state computed once."""
    cache = {}

    def image(*state):
        if state not in cache:
            cache[state] = diffusers_lora_images(pipeline, model, [(loras[k], s) for k, s in state], load_kwargs,
                                                 **LORA_REQUEST)
        return cache[state]
    return image


@pytest.fixture(autouse=True)
def _no_signal_left_over():
    """A test that records a signal (sdexport.interrupts) must not leave it for the next in-process test."""
    yield
    from sdexport import interrupts

    interrupts._received = None


def request_tensors(**values) -> dict:
    """A serve request as the Triton model receives it: every input of sdexport.serve.INPUTS, each value one
    (batch, 1) object array (strings as bytes), None for the inputs not given."""
    import numpy as np

    from sdexport.serve import INPUTS

    out = {f.name: None for f in INPUTS}
    for name, value in values.items():
        out[name] = np.array([[v.encode() if isinstance(v, str) else v] for v in
                              (value if isinstance(value, list) else [value])], dtype=object)
    return out
