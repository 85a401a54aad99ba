"""Presets, tokenizer and reading a model's facts from its own configs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from sdexport.errors import ModelError
from sdexport.models import PRESETS, ModelInfo, build_tokenizer, clip_bpe_path, resolve_model


def test_preset_is_an_ordinary_diffusers_directory(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.tokenizer.model_max_length == 77
    # SD 1.5's scheduler file keeps clip_sample=false for the schedulers that read it
    assert json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False


def test_presets_are_deterministic(tiny_model, tmp_path):
    from sdexport.models import write_preset

    again = write_preset("tiny", tmp_path / "again")
    assert ModelInfo.open(again).weights_sha256 == ModelInfo.open(tiny_model).weights_sha256


def test_random_weights_preset_says_so():
    assert "random" in "sd15-random" and "RANDOM" in PRESETS["sd15-random"].description
    sd15 = PRESETS["sd15-random"]
    assert sd15.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd15.unet["cross_attention_dim"] == 768 and sd15.text_encoder["num_hidden_layers"] == 12
    assert sd15.vae["block_out_channels"] == (128, 256, 512, 512)


def test_tokenizer_gives_sd15_ids():
    tok = build_tokenizer()
    # Token ids of SD 1.5's tokenizer (openai/clip-vit-large-patch14 vocabulary) for this prompt.
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_tokenizer_matches_open_clip_reference():
    """OpenAI CLIP's own SimpleTokenizer (tests/reference, as open_clip ships it: an independent BPE
    implementation) over the BPE file sdexport ships."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = Path(__file__).resolve().parent / "reference" / "clip_simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer_ref", path)
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    ref = ref_mod.SimpleTokenizer(clip_bpe_path())
    ours = build_tokenizer()
    prompts = ["A watercolor painting of a lighthouse at dusk, soft light",
               "isometric 3d render of a tiny cafe, pastel colours, 8k",
               "Portrait photo, 85mm lens, f/1.8, bokeh; dramatic rim-lighting!!"]
    for prompt in prompts:
        assert ours(prompt)["input_ids"] == ref.encode(prompt)


def test_clip_bpe_ships_with_the_package():
    """The vocabulary is package data: no second install step (it was open_clip_torch's wheel before)."""
    import hashlib

    import sdexport

    path = clip_bpe_path()
    assert path.parent == Path(sdexport.__file__).resolve().parent / "data"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_model_facts_come_from_configs(other_model):
    info = ModelInfo.open(other_model)
    assert info.latent_channels == 6
    assert info.vae_scale_factor == 4
    assert info.unet_latent_multiple == 4
    assert info.pixel_multiple == 16
    assert info.cross_attention_dim == 48 == info.text_hidden_size
    assert info.image_size == 96
    assert info.vae_scaling_factor == 0.5
    assert info.scheduler_config["prediction_type"] == "v_prediction"


def test_bad_model_directories(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        ModelInfo.open(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="missing vae/"):
        ModelInfo.open(broken)
    own = tmp_path / "own-manifest"  # a diffusers directory with a manifest.json that is not sdexport's
    shutil.copytree(tiny_model, own)
    (own / "manifest.json").write_text('{"files": []}')
    assert ModelInfo.open(own).family_name == "sd"
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusion3Pipeline"})
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="StableDiffusion3Pipeline' is not supported"):
        ModelInfo.open(other)


def test_a_path_named_like_a_preset(tiny_model, export_fp32, tmp_path, monkeypatch):
    """A path wins over a preset of its name (it is what the user named), but one that is no diffusers model
    says that it hid the preset and how to get the preset (``export tiny -o tiny`` run twice said "-o tiny:
    would overwrite the model directory tiny", an export named tiny "tiny: missing vae/")."""
    from sdexport.models import model_path

    here = tmp_path / "here"
    here.mkdir()
    shutil.copytree(export_fp32, here / "tiny")
    (here / "sdxl-tiny").mkdir()
    shutil.copytree(export_fp32, here / "mine")
    monkeypatch.chdir(here)
    for find in (resolve_model, model_path):  # model_path: export's -o check, before any work
        with pytest.raises(ModelError) as caught:
            find("tiny")
        assert str(caught.value) == (
            "tiny: is the directory ./tiny here (an sdexport export, not a diffusers model), not the built-in "
            "preset tiny (a path wins over a preset name); for the preset, run from another directory, or write "
            "it with 'sdexport preset tiny -o DIR' and give DIR")
    with pytest.raises(ModelError, match=r"^sdxl-tiny: is the directory ./sdxl-tiny here \(not a diffusers "
                                         r"model: no model_index.json; .*not the built-in preset sdxl-tiny"):
        resolve_model("sdxl-tiny")
    with pytest.raises(ModelError) as caught:  # a name that is no preset: the directory's own error, as before
        resolve_model("mine")
    assert str(caught.value).startswith("mine: ") and "preset" not in str(caught.value)
    elsewhere = tmp_path / "elsewhere"  # a diffusers model named like a preset is used, silently
    elsewhere.mkdir()
    shutil.copytree(tiny_model, elsewhere / "tiny")
    monkeypatch.chdir(elsewhere)
    info = resolve_model("tiny")
    assert info.root.samefile(elsewhere / "tiny") and model_path("tiny") == Path("tiny") and info.preset is None


def test_an_exports_preset_is_not_a_path_of_its_name(export_fp32, tmp_path, monkeypatch):
    """An export of a preset whose cache is gone rebuilds the preset for its PyTorch reference, even run from
    a directory that holds a path of the preset's name (it took that path: 'tiny: missing vae/')."""
    from sdexport.runtime import ExportDir

    export = shutil.copytree(export_fp32, tmp_path / "export")
    data = json.loads((export / "manifest.json").read_text())
    data["model"].update(path=str(tmp_path / "gone"), preset="tiny")
    (export / "manifest.json").write_text(json.dumps(data))
    shutil.copytree(export_fp32, tmp_path / "tiny")
    monkeypatch.setenv("SDEXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    info = ExportDir.open(export).source_model()
    assert info.root.parent == tmp_path / "cache" / "presets" and info.preset == "tiny"
