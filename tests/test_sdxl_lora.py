"""LoRA on SDXL: both text encoders and the UNet, fused at export and switched on the engines, against
diffusers' StableDiffusionXLPipeline with the same LoRAs loaded and fused (same seed). LoRA files are made here
with PEFT (diffusers' key names) and converted to kohya's SDXL format (SGM block names ``input_blocks_4_1``,
``lora_te1_``/``lora_te2_``), as sd-scripts writes them. LoRAs of the other architecture are refused (exit 5)
with the engines untouched."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import LORA_REQUEST as REQUEST
from conftest import assert_error, load_manifest, lora_references, run_cli
from sdexport.backends import load_engines
from sdexport.errors import IntegrityError
from sdexport.lora import WeightMap
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir
from test_pipeline import psnr

PARTS = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
         "text_encoder_2": "CLIPTextModelWithProjection"}


def _peft_lora(model, path, seed, targets: dict[str, list[str]], rank=4):
    """A LoRA in diffusers/PEFT format (``unet.<module>.lora_A.weight``, ``text_encoder_2.<module>...``) for the
    parts in ``targets``, random (PEFT's default B is zero)."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    layers, meta = {}, {}
    for part, modules in targets.items():
        library = diffusers if part == "unet" else transformers
        module = getattr(library, PARTS[part]).from_pretrained(model, subfolder=part)
        config = LoraConfig(r=rank, lora_alpha=2 * rank if part == "unet" else rank, init_lora_weights=False,
                            target_modules=modules)
        module.add_adapter(config)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        meta[f"{part}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **meta)
    return path


def _sgm(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path under the names of the SGM (original SDXL) UNet that kohya's sd-scripts trains:
    down_blocks.B.{resnets|attentions}.L -> input_blocks.(1 + B (lpb + 1) + L).{0|1}, mid_block's resnet 0,
    attention, resnet 1 -> middle_block.{0,1,2}, up_blocks.B.*.L -> output_blocks.(B (lpb + 1) + L).{0|1}, and
    a resnet's conv1, conv2, time_emb_proj -> in_layers.2, out_layers.3, emb_layers.1."""
    step = layers_per_block + 1
    block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module)
    mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", module)
    if block:
        kind, b, inner, layer, rest = block.groups()
        index = (1 + int(b) * step if kind == "down" else int(b) * step) + int(layer)
        head = f"{'input' if kind == 'down' else 'output'}_blocks.{index}.{0 if inner == 'resnets' else 1}"
    elif mid:
        inner, layer, rest = mid.groups()
        head = "middle_block." + {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[inner, layer]
    else:
        return module
    if inner == "resnets":
        rest = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}.get(rest, rest)
    return f"{head}.{rest}"


def _kohya_sdxl(peft_file, path, layers_per_block, alpha_per_rank=2.0):
    """The same layers under kohya/sd-scripts' SDXL key names (``lora_unet_input_blocks_4_1_..._to_q.lora_down
    .weight``, ``lora_te1_text_model_...``, ``lora_te2_...``, each with its ``.alpha``)."""
    from safetensors.torch import load_file, save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out = {}
    for key, value in load_file(peft_file).items():
        part, rest = key.split(".", 1)
        module, kind = rest.split(".lora_")
        if part == "unet":
            module = _sgm(module, layers_per_block)
        name = prefixes[part] + module.replace(".", "_")
        down = kind.startswith("A")
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor((value.shape[0] if down else value.shape[1]) * alpha_per_rank)
    save_file(out, path)
    return path


@pytest.fixture(scope="module")
def sdxl_loras(sdxl_tiny_model, tiny_model, tmp_path_factory):
    from test_lora import _peft_lora as sd_lora

    folder = tmp_path_factory.mktemp("sdxl-loras")
    unet = json.loads((sdxl_tiny_model / "unet" / "config.json").read_text())
    a = _peft_lora(sdxl_tiny_model, folder / "a.safetensors", 1, {
        "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "linear_1"],
        "text_encoder": ["q_proj", "v_proj"], "text_encoder_2": ["k_proj", "out_proj", "fc1", "text_projection"]})
    b = _peft_lora(sdxl_tiny_model, folder / "b.safetensors", 2, {
        "unet": ["to_k", "ff.net.2", "conv2", "time_emb_proj"], "text_encoder_2": ["q_proj", "fc2"]}, rank=2)
    sgm_source = _peft_lora(sdxl_tiny_model, folder / "k-src.safetensors", 3, {
        "unet": ["to_q", "to_v", "proj_out", "conv1", "time_emb_proj"], "text_encoder": ["k_proj", "fc1"],
        "text_encoder_2": ["q_proj", "fc2"]})
    kohya = _kohya_sdxl(sgm_source, folder / "k-kohya.safetensors", unet["layers_per_block"])
    sd = sd_lora(tiny_model, folder / "sd.safetensors", 4, ["to_q", "to_k"], ["q_proj"])
    return {"a": a, "b": b, "kohya": kohya, "sd": sd}


@pytest.fixture(scope="module")
def references(sdxl_tiny_model, sdxl_loras):
    return lora_references("StableDiffusionXLPipeline", sdxl_tiny_model, sdxl_loras, {"add_watermarker": False})


def test_kohya_file_is_sgm_named_and_diffusers_reads_it(sdxl_loras, sdxl_tiny_model):
    """The converted file has kohya's SDXL names, and diffusers' SDXL loader maps them back onto the very
    modules the PEFT file names (so the parity below checks the SGM path, not a lucky subset)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.configuration_utils import FrozenDict
    from safetensors.torch import load_file

    keys = list(load_file(sdxl_loras["kohya"]))
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") and "_emb_layers_1." in k for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    unet = json.loads((sdxl_tiny_model / "unet" / "config.json").read_text())
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(sdxl_loras["kohya"]), unet_config=FrozenDict(unet))
    source = load_file(str(sdxl_loras["kohya"]).replace("k-kohya", "k-src"))
    assert len(state) == len(source) and alphas


def test_weights_map_covers_both_text_encoders(export_sdxl):
    export = ExportDir.open(export_sdxl)
    for part in ("text_encoder", "text_encoder_2", "unet"):
        assert WeightMap(export, part).data["unmapped"] == [], part
    (entry,) = WeightMap(export, "text_encoder_2").params["text_projection.weight"]
    assert entry["transpose"]  # a Linear weight, folded into a MatMul


def test_fused_at_export_matches_diffusers(sdxl_tiny_model, sdxl_loras, references, tmp_path):
    from sdexport.export import export as run

    out = run(str(sdxl_tiny_model), tmp_path / "e", loras=[f"{sdxl_loras['a']}:0.7", f"{sdxl_loras['kohya']}:0.5"],
              components=["text_encoder", "text_encoder_2", "unet", "vae_decoder"], max_images=2).root
    manifest = load_manifest(out)
    for name in ("text_encoder", "text_encoder_2", "unet"):
        assert [r["scale"] for r in manifest["components"][name]["key"]["loras"]] == [0.7, 0.5], name
    assert "loras" not in manifest["components"]["vae_decoder"]["key"]
    export = ExportDir.open(out)
    ours = Pipeline(load_engines(export, "ort"), export)(**REQUEST).images
    assert psnr(ours, references(("a", 0.7), ("kohya", 0.5))) >= 40.0
    assert psnr(ours, references()) < 35  # the LoRAs changed the image


@pytest.mark.parametrize("backend", ["ort", pytest.param("torch", marks=pytest.mark.slow)])
def test_switching_a_b_a(export_sdxl, sdxl_loras, references, backend):
    """A -> B -> A -> none -> kohya: each image equals diffusers' with those LoRAs fused, and a state seen before
    gives exactly its earlier image (every switch is computed from the exported weights)."""
    export = ExportDir.open(export_sdxl)
    pipe = Pipeline(load_engines(export, backend), export)
    seen: dict[tuple, np.ndarray] = {}
    order = [(("a", 0.8),), (("b", 1.0),), (("a", 0.8),), (), (("kohya", 0.6), ("b", -0.5))]
    for state in order if backend == "ort" else order[:3]:
        pipe.set_loras([f"{sdxl_loras[k]}:{s}" for k, s in state])
        image = pipe(**REQUEST).images
        assert psnr(image, references(*state)) >= 40.0, state
        if state in seen:
            np.testing.assert_array_equal(image, seen[state])
        seen[state] = image
    assert psnr(seen[(("a", 0.8),)], seen[(("b", 1.0),)]) < 35


@pytest.mark.parametrize("export_name,lora,needle", [
    ("export_sdxl", "sd", "not a LoRA this model can load"),  # SD 1.x shapes on SDXL's layers
    ("export_fp32", "a", "has weights for 'text_encoder_2', which a Stable Diffusion 1.x/2.x model does not have"),
    ("export_refiner", "b", "not a LoRA this model can load"),  # the base model's shapes on the refiner
    ("export_refiner", "a", "has weights for 'text_encoder', which an SDXL refiner does not have"),
])
def test_lora_of_another_architecture_is_exit_5_engines_untouched(request, export_name, lora, needle, sdxl_loras,
                                                                  tmp_path):
    export_dir = request.getfixturevalue(export_name)
    export = ExportDir.open(export_dir)
    pipe = Pipeline(load_engines(export, "ort", components=export.components_for(image=True)), export)
    call = dict(prompt="x", steps=2, seed=0)
    if export.family.name == "sdxl" and "text_encoder" not in export.info.configs:  # the refiner refines images
        from test_img2img import noise_image

        call.update(image=noise_image(80, 80), strength=1.0)
    before = pipe(**call).images
    with pytest.raises(IntegrityError, match=re.escape(needle)):
        pipe.set_loras([str(sdxl_loras[lora])])
    np.testing.assert_array_equal(pipe(**call).images, before)
    out = tmp_path / "o.png"
    args = ["--image", tmp_path / "in.png", "--strength", 1.0] if "image" in call else []
    if args:
        call["image"].save(tmp_path / "in.png")
    result = run_cli("infer", export_dir, "--prompt", "x", "-o", out, "--steps", 2, "--lora", sdxl_loras[lora], *args)
    assert_error(result, 5, needle)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_export_with_a_foreign_lora_writes_nothing(sdxl_tiny_model, sdxl_loras, tmp_path):
    result = run_cli("export", sdxl_tiny_model, "-o", tmp_path / "e", "--components", "text_encoder_2",
                     "--lora", sdxl_loras["sd"])
    assert_error(result, 5, "--lora", "sd.safetensors")
    assert not (tmp_path / "e" / "manifest.json").exists() and not (tmp_path / "e" / "text_encoder_2").exists()


def test_text_encoder_2_is_refittable_by_name(export_sdxl):
    """TensorRT refit names: every initializer text_encoder_2's map points at is a weight TensorRT's parser
    knows and can mark refittable (what build --refittable and the refitter use)."""
    rtx = pytest.importorskip("tensorrt_rtx")
    from sdexport.build import mark_refittable

    wmap = WeightMap(ExportDir.open(export_sdxl), "text_encoder_2")
    names = sorted({e["initializer"] for entries in wmap.params.values() for e in entries})
    log = rtx.Logger(rtx.Logger.ERROR)
    network = rtx.Builder(log).create_network(0)
    assert rtx.OnnxParser(network, log).parse_from_file(str(wmap.onnx_path))
    assert mark_refittable(rtx, network, names) == "REFIT_INDIVIDUAL"
    assert all(network.are_weights_marked_refittable(n) for n in names)
