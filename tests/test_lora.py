"""LoRA fused at export and switched on the engines, against diffusers' own pipeline with the same LoRAs
loaded and fused (same seed); LoRA files made here with PEFT (diffusers/PEFT key names) and converted to
kohya key names; every order of switching; LoRAs that do not fit; the weights map against the ONNX file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import LORA_REQUEST as REQUEST
from conftest import (assert_error, assert_refused, cli, diffusers_lora_images, load_manifest, lora_references,
                      run_cli, tree_digest)
from sdexport.backends import load_engines
from sdexport.errors import IntegrityError, UsageError
from sdexport.lora import WeightMap, open_loras, parse_lora
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir
from test_pipeline import psnr



def _peft_lora(model, path, seed, unet_targets, te_targets=(), rank=4, alpha=8, lora_bias=False):
    """A LoRA in diffusers/PEFT format (``unet.<module>.lora_A.weight``), random (PEFT's default B is zero)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    layers, meta = {}, {}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(unet_targets))
    unet.add_adapter(config)
    layers["unet_lora_layers"] = get_peft_model_state_dict(unet)
    meta["unet_lora_adapter_metadata"] = config.to_dict()
    if te_targets:
        te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        config = LoraConfig(r=rank, lora_alpha=alpha // 2, init_lora_weights=False, target_modules=list(te_targets),
                            lora_bias=lora_bias)
        te.add_adapter(config)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        meta["text_encoder_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **meta)
    return path


def _kohya(peft_file, path, alpha_per_rank=2.0):
    """The same layers under kohya/A1111 key names (``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` and
    ``.alpha``), as sd-scripts writes them."""
    from safetensors.torch import load_file, save_file

    out = {}
    for key, value in load_file(peft_file).items():
        part, rest = key.split(".", 1)
        module, kind = rest.split(".lora_")
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        down = kind.startswith("A")
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = value
        rank = value.shape[0] if down else value.shape[1]
        out[f"{name}.alpha"] = torch.tensor(rank * alpha_per_rank)
    save_file(out, path)
    return path


@pytest.fixture(scope="session")
def loras(tiny_model, other_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    a = _peft_lora(tiny_model, folder / "a.safetensors", 1, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                   ["q_proj", "v_proj", "out_proj"])
    b = _peft_lora(tiny_model, folder / "b.safetensors", 2, ["to_k", "ff.net.2", "conv2", "time_emb_proj"], rank=2, alpha=2)
    kohya = _kohya(_peft_lora(tiny_model, folder / "c-src.safetensors", 3, ["to_q", "to_v", "ff.net.0.proj"],
                              ["k_proj", "fc1"]), folder / "c-kohya.safetensors")
    foreign = _peft_lora(other_model, folder / "other-model.safetensors", 4, ["to_q", "to_k"])  # other shapes
    bias = _peft_lora(tiny_model, folder / "bias.safetensors", 5, ["to_q"], ["q_proj"], lora_bias=True)
    from safetensors.torch import load_file, save_file

    state = load_file(a)
    save_file({k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}, folder / "missing.safetensors")
    save_file({k.replace("text_encoder.", "text_encoder_2."): v for k, v in state.items()}, folder / "te2.safetensors")
    # kohya's attention layers come out of diffusers' conversion as `attn1.processor.to_q_lora.down.weight`:
    # one more such layer, in a block this model lacks (diffusers' loader drops it with a warning)
    state = load_file(kohya)
    state.update({k.replace("down_blocks_0", "down_blocks_7"): v.clone() for k, v in state.items()
                  if "down_blocks_0" in k and "_to_q." in k})
    save_file(state, folder / "kohya-missing.safetensors")
    save_file({"something.weight": torch.zeros(3)}, folder / "nolora.safetensors")
    (folder / "corrupt.safetensors").write_bytes(a.read_bytes()[:300])
    return {"a": a, "b": b, "kohya": kohya, "foreign": foreign, "bias": bias, "missing": folder / "missing.safetensors",
            "te2": folder / "te2.safetensors", "nolora": folder / "nolora.safetensors",
            "corrupt": folder / "corrupt.safetensors", "kohya-missing": folder / "kohya-missing.safetensors"}


def diffusers_images(model, loras, **kw):
    """diffusers' StableDiffusionPipeline with ``loras`` [(file, scale)] loaded, weighted and fused."""
    return diffusers_lora_images("StableDiffusionPipeline", model, loras, **kw)


# --- parsing ------------------------------------------------------------------------------------------

def test_parse_lora(tmp_path):
    assert parse_lora("x.safetensors") == (tmp_path.__class__("x.safetensors"), 1.0)
    assert parse_lora("x.safetensors:0.5")[1] == 0.5 and parse_lora("x:-1")[1] == -1.0
    assert str(parse_lora("dir:with:colons/x.safetensors")[0]) == "dir:with:colons/x.safetensors"
    for bad in ("x:nan", "x:inf", "x:-inf"):
        with pytest.raises(UsageError, match="not a finite number"):
            parse_lora(bad)
    with pytest.raises(UsageError, match="no such file$"):
        open_loras([str(tmp_path / "none.safetensors")])
    (tmp_path / "a.safetensors").write_bytes(b"")
    for tail in ("0,8", "abc"):  # the file exists: the line says the scale is what is wrong
        with pytest.raises(UsageError, match=f"no such file .*a.safetensors is one: '{tail}' after it is not a number"):
            open_loras([f"{tmp_path / 'a.safetensors'}:{tail}"])
    assert parse_lora("x:100")[1] == 100.0 and parse_lora("x:-100")[1] == -100.0
    for bad in ("x:100.5", "x:-101", "x:1e30"):  # finite, but the fused weights overflow into NaN images
        with pytest.raises(UsageError, match=r"outside \[-100, 100\]"):
            parse_lora(bad)


# --- fused at export ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused_export(tiny_model, loras, tmp_path_factory):
    from sdexport.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny-lora"
    export(str(tiny_model), out, loras=[f"{loras['a']}:0.7", f"{loras['kohya']}:0.5"], max_images=2)
    return out


def test_export_with_loras_matches_diffusers(fused_export, tiny_model, loras):
    export = ExportDir.open(fused_export)
    pipe = Pipeline(load_engines(export, "ort"), export)
    ours = pipe(**REQUEST).images
    theirs = diffusers_images(tiny_model, [(loras["a"], 0.7), (loras["kohya"], 0.5)], **REQUEST)
    assert psnr(ours, theirs) >= 40.0
    base = diffusers_images(tiny_model, [], **REQUEST)
    assert psnr(ours, base) < 35  # the LoRAs changed the image: the parity above is not the base model's


def test_manifest_records_the_loras(fused_export, loras):
    from sdexport.manifest import sha256_file

    manifest = load_manifest(fused_export)
    want = [{"file": str(loras["a"].resolve()), "sha256": sha256_file(loras["a"]), "scale": 0.7},
            {"file": str(loras["kohya"].resolve()), "sha256": sha256_file(loras["kohya"]), "scale": 0.5}]
    assert manifest["model"]["loras"] == want
    for name in ("unet", "text_encoder"):
        assert manifest["components"][name]["key"]["loras"] == want
    for name in ("vae_decoder", "vae_encoder"):  # a LoRA never changes the VAE
        assert "loras" not in manifest["components"][name]["key"]


def test_changed_lora_means_reexport(tiny_model, loras, tmp_path):
    from sdexport.export import export

    out = tmp_path / "te"
    messages: list[str] = []
    run = lambda lora_args: export(str(tiny_model), out, components=["text_encoder"], loras=lora_args,  # noqa: E731
                                   say=messages.append)
    run([f"{loras['a']}:0.7"])
    messages.clear()
    run([f"{loras['a']}:0.7"])
    assert any("up to date" in m for m in messages)
    for changed in ([f"{loras['a']}:0.6"], [f"{loras['b']}:0.7"], []):  # scale, file, and none at all
        messages.clear()
        run(changed)
        assert any("text_encoder: exporting" in m for m in messages), messages
    copy = tmp_path / "a-copy.safetensors"  # same path and scale, other contents: the sha256 changes
    shutil.copy(loras["a"], copy)
    run([f"{copy}:0.7"])
    copy.write_bytes(loras["kohya"].read_bytes())
    messages.clear()
    run([f"{copy}:0.7"])
    assert any("text_encoder: exporting" in m for m in messages), messages


def test_another_lora_scale_reexports_only_what_the_lora_applies_to(fused_export, tiny_model, loras, tmp_path):
    """A LoRA changes the UNet and text encoders, never the VAE: a re-export with another scale re-exported the
    VAE too (another LoRA set counted as another export). Now the VAE's files stay as they were (same inode,
    mtime and manifest entry) and the UNet and text encoder are re-exported with the new scale."""
    from sdexport.export import export
    from sdexport.manifest import sha256_file

    out = shutil.copytree(fused_export, tmp_path / "e")
    before = load_manifest(out)

    def files(name):
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / name).iterdir()}

    was = {name: files(name) for name in before["components"]}
    messages: list[str] = []
    new = [f"{loras['a']}:0.3", f"{loras['kohya']}:0.5"]
    export(str(tiny_model), out, loras=new, max_images=2, say=messages.append)
    after = load_manifest(out)
    for name in ("vae_decoder", "vae_encoder"):
        assert any(f"{name}: up to date" in m for m in messages), messages
        assert files(name) == was[name], name
        assert after["components"][name] == before["components"][name]
        assert sha256_file(out / name / "model.onnx") == before["components"][name]["sha256"]
    want = [lora.to_json() for lora in open_loras(new)]
    assert after["model"]["loras"] == want
    for name in ("unet", "text_encoder"):
        assert set(files(name).values()).isdisjoint(was[name].values()), name  # written anew
        assert after["components"][name]["key"]["loras"] == want
        assert after["components"][name]["sha256"] != before["components"][name]["sha256"]
        assert sha256_file(out / name / "model.onnx") == after["components"][name]["sha256"]
    ExportDir.open(out).check_components(list(after["components"]))  # one export: the runtime opens it all


def test_another_lora_scale_over_built_engines_names_the_way_that_keeps_the_vae(fused_export, tiny_model, loras,
                                                                              tmp_path):
    """With an engine built from the UNet (here the ORT CUDA variant), another LoRA scale is refused without --force.
    The line said "re-export every component with --force", which re-exports the VAE too and deletes what was built
    from it (the VAE's ORT variant). It now names the components the LoRAs apply to; that command keeps the VAE,
    its variant and their manifest entries, and replaces the UNet's variant."""
    import re

    out = shutil.copytree(fused_export, tmp_path / "e")
    assert run_cli("build", out, "--backend", "ort").exit_code == 0
    before = load_manifest(out)
    assert set(before["ort_cuda"]) == {"unet", "vae_decoder"}
    vae_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "vae" in str(p.relative_to(out))}
    new = [f"--lora={loras['a']}:0.3", f"--lora={loras['kohya']}:0.5"]
    result = run_cli("export", tiny_model, "-o", out, "--max-batch", 2, *new)
    assert_error(result, 2, "ort_cuda/unet would stay", "--components text_encoder,unet --force",
                 "the VAE and what was built from it stay")
    advised = re.search(r"\((--components \S+ --force);", result.stderr).group(1).split()
    assert advised[:2] == ["--components", "text_encoder,unet"] and advised[2] == "--force"
    result = run_cli("export", tiny_model, "-o", out, "--max-batch", 2, *new, *advised)
    assert result.exit_code == 0, result.stderr
    after = load_manifest(out)
    assert {p: p.read_bytes() for p in vae_files} == vae_files  # the VAE and its ORT variant, byte for byte
    for name in ("vae_decoder", "vae_encoder"):
        assert after["components"][name] == before["components"][name]
    assert after["ort_cuda"] == {"vae_decoder": before["ort_cuda"]["vae_decoder"]}  # the UNet's went with the UNet
    assert after["model"]["loras"] == [lora.to_json() for lora in open_loras([f"{loras['a']}:0.3",
                                                                             f"{loras['kohya']}:0.5"])]
    ExportDir.open(out).check_components(list(after["components"]))


# --- the weights map ----------------------------------------------------------------------------------

def test_weights_map_against_the_onnx_file(export_fp32, tiny_model):
    """Every UNet/text encoder parameter is found; a Linear weight sits transposed in a renamed MatMul
    initializer, a conv weight as itself: read back from the ONNX file and compared with diffusers' module."""
    import onnx
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper

    export = ExportDir.open(export_fp32)
    wmap = WeightMap(export, "unet")
    assert wmap.data["unmapped"] == []
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(wmap.onnx_path)).graph.initializer}
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    (entry,) = wmap.params[q]
    assert entry["transpose"] and entry["initializer"].startswith("onnx::MatMul")
    np.testing.assert_array_equal(inits[entry["initializer"]], unet.get_parameter(q).detach().numpy().T)
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert wmap.params[conv] == [{"initializer": "unet." + conv, "transpose": False, "shape": [32, 32, 3, 3],
                                  "dtype": "float32"}]
    for name, entries in wmap.params.items():  # each entry holds the parameter's bytes
        value = unet.get_parameter(name).detach().numpy()
        for e in entries:
            got = inits[e["initializer"]]
            np.testing.assert_array_equal(got.T if e["transpose"] else got.reshape(value.shape), value)
    assert set(wmap.params) == {n for n, _ in unet.named_parameters()}
    assert WeightMap(export, "text_encoder").data["unmapped"] == []
    with pytest.raises(IntegrityError, match="no weights_map.json"):
        WeightMap(export, "vae_decoder")


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def export_external(tiny_model, tmp_path_factory, request):
    """tiny exported as a model over 2 GB is (weights in one external data file, tensors under 1 KiB inline)."""
    from conftest import _export

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sdexport.export.TWO_GB", 64 * 2**20 + 1)
        return _export(tiny_model, tmp_path_factory.mktemp("exports") / f"tiny-ext-{request.param}",
                       dtype=request.param, components=["text_encoder", "unet", "vae_decoder"])


def test_base_weights_are_the_onnx_files_values(export_external):
    """The base weights a switch reads (memory-mapped from the external data, or decoded where stored in the
    graph) equal onnx's own loading of the file, value for value and dtype for dtype, both ways of storing."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    export = ExportDir.open(export_external)
    for component in ("unet", "text_encoder"):
        wmap = WeightMap(export, component)
        model = onnx.load(str(wmap.onnx_path))
        header = {i.name: uses_external_data(i) for i in onnx.load(str(wmap.onnx_path), load_external_data=False).graph.initializer}
        want = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        names = {e["initializer"] for entries in wmap.params.values() for e in entries}
        assert {header[n] for n in names} == {True, False}, component  # both storages are exercised
        for name in names:
            got = wmap.base_initializer(name)
            assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
            np.testing.assert_array_equal(got, want[name])
            assert not got.flags.writeable  # the file's values: a switch never writes into them


@pytest.mark.parametrize("live", ["0", "1"])
def test_switching_on_an_export_with_external_data(export_external, export_fp32, export_fp16, loras, monkeypatch,
                                                   live):
    """Switches on an export whose weights sit in an external data file (read memory-mapped) give, state for
    state, the images of the same switches on the export that holds the same weights inside the ONNX file, and
    A's image again after B: new sessions and writes into the sessions' buffers alike."""
    monkeypatch.setenv("SDEXPORT_ORT_LIVE_WEIGHTS", live)
    inline = export_fp16 if "fp16" in export_external.name else export_fp32
    pipes = [Pipeline(load_engines(ExportDir.open(e), "ort"), ExportDir.open(e)) for e in (export_external, inline)]
    images = {}
    for state in ((("a", 0.8),), (("b", 1.0),), (("a", 0.8),), ()):
        got = []
        for pipe in pipes:
            pipe.set_loras([f"{loras[k]}:{s}" for k, s in state])
            got.append(pipe(**REQUEST).images)
        assert psnr(got[0], got[1]) >= 60.0, state
        if state in images:
            np.testing.assert_array_equal(got[0], images[state])
        images[state] = got[0]
    assert psnr(images[(("a", 0.8),)], images[()]) < 35


@pytest.mark.parametrize("key,value,needle", [("location", "../elsewhere.bin", "points outside its folder"),
                                               ("location", "gone.bin", "external data gone.bin is missing"),
                                               ("length", None, "bytes of data for")])
def test_base_weights_outside_the_export_folder_are_refused(export_external, tmp_path, key, value, needle):
    """An initializer whose external data points out of its folder (which the manifest did not verify), at a file
    that is not there, or with a length that is not its values' is an integrity error, not a read of other bytes."""
    import onnx

    export = ExportDir.open(export_external)
    wmap = WeightMap(export, "unet")
    model = onnx.load(str(wmap.onnx_path), load_external_data=False)
    name = next(e["initializer"] for entries in wmap.params.values() for e in entries
                if any(i.name == e["initializer"] and i.external_data for i in model.graph.initializer))
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == key:
                entry.value = value if value is not None else str(int(entry.value) + 4)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(model.SerializeToString())  # the header only
    wmap.onnx_path, wmap._base = tmp_path / "unet" / "model.onnx", None
    with pytest.raises(IntegrityError, match=needle):
        wmap.base_initializer(name)


# --- switched on the engines --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references(tiny_model, loras):
    return lora_references("StableDiffusionPipeline", tiny_model, loras)


@pytest.mark.parametrize("backend", ["ort", pytest.param("torch", marks=pytest.mark.slow)])
def test_switching_in_every_order(export_fp32, loras, references, backend):
    """A, B, A, none, B, A+B, kohya, none: each image equals diffusers' with those LoRAs fused; a state seen
    before gives exactly the image it gave then (computed from the base weights, never on top of the last)."""
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, backend), export)
    seen: dict[tuple, np.ndarray] = {}
    order = [(("a", 0.8),), (("b", 1.0),), (("a", 0.8),), (), (("b", 1.0),), (("a", 0.8), ("b", -0.5)),
             (("kohya", 0.6),), ()]
    for state in order:
        timings = pipe.set_loras([f"{loras[k]}:{s}" for k, s in state])
        assert timings["switch_ms"] > 0
        # the fuse's parts (reported by bench): the files read, the base weights read from the engines
        assert 0 <= timings["files_ms"] + timings["base_ms"] <= timings["fuse_ms"] + 1e-6
        assert (timings["base_ms"] > 0) == bool(state), (state, timings)
        image = pipe(**REQUEST).images
        assert psnr(image, references(*state)) >= 40.0, state
        if state in seen:
            np.testing.assert_array_equal(image, seen[state])
        seen[state] = image
    assert psnr(seen[(("a", 0.8),)], seen[()]) < 35 and psnr(seen[(("b", 1.0),)], seen[()]) < 35


@pytest.mark.parametrize("state", [(("a", 0.8),), (("a", 0.7), ("kohya", 0.5)), (("b", 1.0), ("a", -0.5)),
                                   (("bias", 0.9),)])
def test_kept_lora_factors_give_the_full_paths_values(tiny_model, loras, state, monkeypatch):
    """A pipeline keeps each LoRA file's PEFT layers after its first switch (lora.LoraFactors). The values a
    later switch computes from them are bit-identical to diffusers' load + set_adapters + fuse_lora on the same
    base weights, and diffusers does not read the file again. A LoRA with biases (whose merge needs more than
    the delta) takes the full path every time."""
    import sdexport.lora as lora_mod
    from sdexport.models import ModelInfo

    info = ModelInfo.open(tiny_model)
    modules = {p: info.load_torch(p) for p in lora_mod.lora_parts(info)}

    def base(part, name):
        return modules[part].get_parameter(name).detach()

    files = open_loras([f"{loras[k]}:{s}" for k, s in state])
    full = lora_mod.fused_params(info, files, list(modules), base=base)
    factors: dict = {}
    lora_mod.fused_params(info, files, list(modules), base=base, factors=factors)  # the first switch reads them
    reads = []
    real = lora_mod._load_adapters
    monkeypatch.setattr(lora_mod, "_load_adapters", lambda *a, **k: reads.append(a) or real(*a, **k))
    kept = lora_mod.fused_params(info, files, list(modules), base=base, factors=factors)
    assert full and {p: sorted(v) for p, v in kept.items()} == {p: sorted(v) for p, v in full.items()}
    for part, values in full.items():
        for name, value in values.items():
            assert torch.equal(kept[part][name], value), (part, name)
    has_bias = any(k == "bias" for k, _ in state)
    assert all(factors[f.sha256].supported for f in files) == (not has_bias)
    assert bool(reads) == has_bias  # kept factors: no second read by diffusers


@pytest.mark.parametrize("keep, reads", [(1, 3), (2, 2)])
def test_kept_lora_factors_are_the_files_used_last(tiny_model, loras, monkeypatch, keep, reads):
    """A, B, A: with room for one file the third switch reads A again; with room for two it does not."""
    import sdexport.lora as lora_mod
    from sdexport.models import ModelInfo

    info = ModelInfo.open(tiny_model)
    modules = {p: info.load_torch(p) for p in lora_mod.lora_parts(info)}
    calls = []
    real = lora_mod._load_adapters
    monkeypatch.setattr(lora_mod, "_load_adapters", lambda *a, **k: calls.append(a) or real(*a, **k))
    factors: dict = {}
    for name in ("a", "b", "a"):
        lora_mod.fused_params(info, open_loras([str(loras[name])]), list(modules),
                              base=lambda part, n: modules[part].get_parameter(n).detach(), factors=factors,
                              keep_factors=keep)
    assert len(calls) == reads and len(factors) == keep


def test_a_switch_writes_into_the_session_or_opens_only_the_ones_whose_weights_change(export_fp32, loras,
                                                                                        monkeypatch):
    """B changes only the UNet: switching to it keeps the text encoder's ONNX Runtime session. The first switch
    opens the UNet's session over buffers of sdexport's; later switches write into them, each weight checked
    once against a new session; switching to the set the engines hold changes nothing; A, then none, then B
    still give their own images, and once every weight was checked a switch opens no session at all."""
    export = ExportDir.open(export_fp32)
    monkeypatch.setenv("SDEXPORT_ORT_LIVE_WEIGHTS", "1")  # the default on CUDA; on the CPU new sessions
    pipe = Pipeline(load_engines(export, "ort"), export)
    base = pipe(**REQUEST).images
    te, unet = pipe.engines["text_encoder"], pipe.engines["unet"]
    sessions = (te.session, unet.session)
    pipe.set_loras([f"{loras['b']}:1.0"])
    assert te.session is sessions[0] and unet.session is not sessions[1] and unet._live is not None
    with_b, sessions = pipe(**REQUEST).images, (te.session, unet.session)
    opened = (te.sessions_opened, unet.sessions_opened)
    timings = pipe.set_loras([f"{loras['b']}:1.0"])  # the same set
    assert (te.session, unet.session) == sessions and timings["apply_ms"] == 0.0
    assert (te.sessions_opened, unet.sessions_opened) == opened
    np.testing.assert_array_equal(pipe(**REQUEST).images, with_b)
    pipe.set_loras([f"{loras['b']}:0.5"])  # another scale is another set: written in place, checked once
    assert unet.session is sessions[1] and unet.sessions_opened == opened[1] + 1
    pipe.set_loras([f"{loras['a']}:0.8"])  # A changes the text encoder too
    assert te.session is not sessions[0]
    pipe.set_loras([])
    # the file's weights again, in a session that reads them unpacked: the exported image up to kernel noise
    # (1.7e-6 measured), where the switches between LoRAs below are exact
    np.testing.assert_allclose(pipe(**REQUEST).images, base, rtol=0, atol=1e-5)
    none = pipe(**REQUEST).images
    opened = (te.sessions_opened, unet.sessions_opened)
    pipe.set_loras([f"{loras['b']}:1.0"])
    np.testing.assert_array_equal(pipe(**REQUEST).images, with_b)
    pipe.set_loras([f"{loras['a']}:0.8"])
    pipe.set_loras([])
    np.testing.assert_array_equal(pipe(**REQUEST).images, none)
    assert (te.sessions_opened, unet.sessions_opened) == opened  # every weight checked: writes only
    assert unet.session is sessions[1]


def test_a_switch_that_leaves_a_component_as_it_is_keeps_its_live_weights(export_fp32, loras, monkeypatch):
    """A -> A+B where B changes only the UNet: the text encoder is written the values it holds, its probe
    output cannot move, and that is no reason to give up writing in place (found in review: it was)."""
    monkeypatch.setenv("SDEXPORT_ORT_LIVE_WEIGHTS", "1")
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, "ort"), export)
    te = pipe.engines["text_encoder"]
    pipe.set_loras([f"{loras['a']}:0.8"])
    pipe.set_loras([f"{loras['a']}:0.8", f"{loras['b']}:1.0"])
    assert te._live is not None and te._live_allowed
    both = pipe(**REQUEST).images
    pipe.set_loras([f"{loras['b']}:1.0"])
    pipe.set_loras([f"{loras['a']}:0.8", f"{loras['b']}:1.0"])
    np.testing.assert_array_equal(pipe(**REQUEST).images, both)
    assert te._live is not None


@pytest.mark.parametrize("how", ["writes-ignored", "env", "cpu-default"])
def test_where_writes_do_not_reach_the_results_switches_open_sessions(export_fp32, loras, monkeypatch, how):
    """If ONNX Runtime read a copy instead of the buffers (a folded constant, a packed weight), the check sees
    the probe output unchanged: the engine opens new sessions from then on, and every image is still right.
    SDEXPORT_ORT_LIVE_WEIGHTS=0 asks for new sessions from the start, as the CPU does by default."""
    from sdexport.backends import ort as ort_backend

    if how == "env":
        monkeypatch.setenv("SDEXPORT_ORT_LIVE_WEIGHTS", "0")
    elif how == "cpu-default":
        monkeypatch.delenv("SDEXPORT_ORT_LIVE_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("SDEXPORT_ORT_LIVE_WEIGHTS", "1")
        monkeypatch.setattr(ort_backend._LiveWeights, "_copy", lambda self, name, value: None)
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, "ort"), export)
    base = pipe(**REQUEST).images
    pipe.set_loras([f"{loras['a']}:0.8"])
    with_a = pipe(**REQUEST).images
    assert not np.array_equal(with_a, base)
    pipe.set_loras([])
    np.testing.assert_array_equal(pipe(**REQUEST).images, base)
    unet = pipe.engines["unet"]
    assert unet._live is None and not unet._live_allowed
    pipe.set_loras([f"{loras['a']}:0.8"])
    np.testing.assert_array_equal(pipe(**REQUEST).images, with_a)


def test_switched_equals_fused_at_export(export_fp32, fused_export, loras):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, "ort"), export)
    pipe.set_loras([f"{loras['a']}:0.7", f"{loras['kohya']}:0.5"])
    fused = ExportDir.open(fused_export)
    assert psnr(pipe(**REQUEST).images, Pipeline(load_engines(fused, "ort"), fused)(**REQUEST).images) >= 60


def test_fp16_weights_map_equals_comparing_every_initializer_in_full(export_fp16, tiny_model):
    """The map of an FP16 export (values matched within an FP16 ulp) is the one a full comparison of every
    parameter with every initializer of its size gives: the sampled pre-check that keeps build_weight_map
    from being quadratic in same-size weights drops no match and adds none."""
    import onnx
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper

    wmap = WeightMap(ExportDir.open(export_fp16), "unet")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(wmap.onnx_path)).graph.initializer}
    inits = {k: v for k, v in inits.items() if v.dtype.kind == "f" and v.size >= 2}
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    ulp_matched = 0
    for name, param in unet.named_parameters():
        value = param.detach().numpy()
        want = set()
        for init, arr in inits.items():
            tol = dict(rtol=2.0**-10, atol=2.0**-23) if arr.dtype == np.float16 else dict(rtol=0, atol=0)
            for form, transposed in [(value, False)] + ([(value.T, True)] if value.ndim == 2 else []):
                if arr.size == form.size and np.allclose(arr.astype(np.float32).reshape(form.shape), form, **tol) \
                        and (arr.ndim != 2 or not transposed or arr.shape == form.shape):
                    want.add((init, transposed))
        got = {(e["initializer"], e["transpose"]) for e in wmap.params.get(name, [])}
        assert got == want, name
        ulp_matched += any(not np.array_equal(inits[i].astype(np.float32).reshape(-1),
                                              (value.T if t else value).astype(np.float16).astype(np.float32).reshape(-1))
                           for i, t in got)
    assert ulp_matched > 0  # the export has weights only the closeness path finds: that path is exercised


@pytest.mark.slow
def test_switching_on_an_fp16_export(export_fp16, export_fp32, loras):
    """The map holds FP16 initializers (matched within an FP16 ulp where ModelOpt's cast differs from numpy's);
    switched, the FP16 engines are as far from the switched FP32 ones as the unswitched are from each other."""
    wmap = WeightMap(ExportDir.open(export_fp16), "unet")
    assert wmap.data["unmapped"] == [] and {e["dtype"] for v in wmap.params.values() for e in v} >= {"float16"}
    images = {}
    for path in (export_fp16, export_fp32):
        export = ExportDir.open(path)
        pipe = Pipeline(load_engines(export, "ort"), export)
        images[path, "base"] = pipe(**REQUEST).images
        pipe.set_loras([f"{loras['a']}:0.8"])
        images[path, "a"] = pipe(**REQUEST).images
    fp16_error = psnr(images[export_fp16, "base"], images[export_fp32, "base"])
    assert psnr(images[export_fp16, "a"], images[export_fp32, "a"]) >= fp16_error - 3
    assert psnr(images[export_fp16, "a"], images[export_fp16, "base"]) < fp16_error - 3


def test_shared_initializer_is_refused_and_fused_at_export_instead(export_fp32, tiny_model, loras, tmp_path):
    """The exporter stores equal tensors once (the tiny text encoder's zero biases): a LoRA that changes one
    q_proj bias cannot be switched onto it, but fuses at export and matches diffusers there."""
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, "ort"), export)
    before = pipe(**REQUEST).images
    with pytest.raises(IntegrityError, match="fuse the LoRA at export instead"):
        pipe.set_loras([str(loras["bias"])])
    np.testing.assert_array_equal(pipe(**REQUEST).images, before)
    from sdexport.export import export as run

    out = run(str(tiny_model), tmp_path / "bias", loras=[str(loras["bias"])], max_images=2).root
    fused = ExportDir.open(out)
    ours = Pipeline(load_engines(fused, "ort"), fused)(**REQUEST).images
    assert psnr(ours, diffusers_images(tiny_model, [(loras["bias"], 1.0)], **REQUEST)) >= 40.0


# --- LoRAs that do not fit, bad files -----------------------------------------------------------------

@pytest.mark.parametrize("name,needle", [
    ("foreign", "not a LoRA this model can load"),  # same module names, other shapes
    ("missing", "match no layer of this model"),
    ("kohya-missing", "2 of its 22 unet layers match no layer of this model"),  # 20 found, attention included
    ("te2", "'text_encoder_2', which a Stable Diffusion 1.x/2.x model does not have"),
    ("nolora", "not a LoRA this model can load"),
    ("corrupt", "not a LoRA this model can load"),
])
def test_a_lora_that_does_not_fit_leaves_the_engines_untouched(export_fp32, loras, name, needle):
    export = ExportDir.open(export_fp32)
    pipe = Pipeline(load_engines(export, "ort"), export)
    pipe.set_loras([f"{loras['a']}:0.8"])
    before = pipe(**REQUEST).images
    with pytest.raises(IntegrityError, match=needle):
        pipe.set_loras([str(loras[name])])
    with pytest.raises(IntegrityError, match=needle):  # with a good one first: still nothing applied
        pipe.set_loras([str(loras["b"]), str(loras[name])])
    np.testing.assert_array_equal(pipe(**REQUEST).images, before)


def test_cli_lora_errors_write_nothing(export_fp32, tiny_model, loras, tmp_path):
    out = tmp_path / "o.png"
    cases = [((f"{loras['a']}:nan",), 2, "not a finite number"),
             ((str(tmp_path / "none.safetensors"),), 2, "no such file"),
             ((str(loras["corrupt"]),), 5, "not a LoRA this model can load"),
             ((str(loras["missing"]),), 5, "match no layer"),
             ((str(loras["kohya-missing"]),), 5, "match no layer"),
             ((str(loras["foreign"]),), 5, "not a LoRA this model can load")]
    for lora_args, code, needle in cases:
        result = run_cli("infer", export_fp32, "--prompt", "x", "-o", out, "--steps", 1,
                         *[a for arg in lora_args for a in ("--lora", arg)])
        assert_error(result, code, needle)
        assert not out.exists()
        result = run_cli("export", tiny_model, "-o", tmp_path / "exp", "--components", "text_encoder",
                         *[a for arg in lora_args for a in ("--lora", arg)])
        assert_error(result, code, needle)
        assert not (tmp_path / "exp").exists()  # checked before the output folder is made and locked


def test_cli_lora_directory_names_the_file_to_give(export_fp32, tiny_model, loras, tmp_path):
    """A LoRA as the Hub ships it is a folder holding pytorch_lora_weights.safetensors. `--lora FOLDER` said
    "no such file" about a folder that exists; the line now says it is a directory and names the file in it."""
    folder = tmp_path / "my-lora"
    folder.mkdir()
    shutil.copy(loras["a"], folder / "pytorch_lora_weights.safetensors")
    weights = folder / "pytorch_lora_weights.safetensors"
    for spec in (str(folder), f"{folder}:0.8"):
        proc = cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--steps", 1, "--lora", spec)
        line = assert_refused(proc, 2, "a directory, not a LoRA file", str(weights))
        assert "no such file" not in line and not (tmp_path / "o.png").exists()
        proc = cli("export", tiny_model, "-o", tmp_path / "exp", "--lora", spec)
        assert_refused(proc, 2, "a directory, not a LoRA file", str(weights))
        assert not (tmp_path / "exp").exists()
    assert_refused(cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--lora", tmp_path / "exp2"),
                   2, "no such file")  # a path that is not there stays "no such file"
    (tmp_path / "empty").mkdir()
    assert_refused(cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--lora", tmp_path / "empty"),
                   2, "a directory", "no .safetensors or .bin file")


def test_cli_lora_that_does_not_fit_is_the_only_line(export_fp32, tiny_model, loras, tmp_path):
    """PEFT's warnings about the layers it could not place (printed before our line) stay off stderr, and an
    export into an earlier export leaves it as it was."""
    for name in ("kohya-missing", "foreign"):
        proc = cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--steps", 1, "--lora",
                   loras[name])
        line = assert_refused(proc, 5, loras[name].name)
        assert proc.stderr.strip() == line and not (tmp_path / "o.png").exists()
    before = tree_digest(export_fp32)
    proc = cli("export", tiny_model, "-o", export_fp32, "--lora", loras["kohya-missing"])
    assert proc.stderr.strip() == assert_refused(proc, 5, "match no layer")  # refused before any work
    assert tree_digest(export_fp32) == before


def test_cli_lora_holding_nan_is_exit_5_and_writes_nothing(export_fp32, tiny_model, loras, tmp_path):
    """A LoRA file with a NaN exported with exit 0 (an export that draws only NaN) and inferred into exit 6."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(loras["a"])
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad)
    result = run_cli("export", tiny_model, "-o", tmp_path / "exp", "--components", "unet", "--lora", bad)
    assert_error(result, 5, "not finite", "nan.safetensors")
    assert not (tmp_path / "exp" / "manifest.json").exists()
    result = run_cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--steps", 1, "--lora", bad)
    assert_error(result, 5, "not finite", "nan.safetensors")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name, needle", [("corrupt", "not a LoRA this model can load"), ("nan", "not finite"),
                                          ("foreign", "size mismatch"), ("missing", "match no layer"),
                                          ("te2", "has weights for 'text_encoder_2'")])
def test_serve_write_repository_reads_its_loras_first(export_fp32, loras, tmp_path, name, needle):
    """The repository records the LoRA for the server to load at start: a file it cannot read, or one whose
    layers do not fit this model (other shapes, other module names), was written with exit 0 (the server then
    failed at load). Checked as infer checks it, on modules without weights."""
    from safetensors.torch import load_file, save_file

    path = loras.get(name)
    if name == "nan":
        tensors = {k: v.clone().fill_(float("nan")) for k, v in load_file(loras["a"]).items()}
        save_file(tensors, path := tmp_path / "nan.safetensors")
    result = run_cli("serve", export_fp32, "--write-repository", tmp_path / "repo", "--lora", path)
    assert_error(result, 5, needle)
    assert not (tmp_path / "repo" / "sdexport").exists()


def test_serve_write_repository_wrong_shapes_one_line(export_fp32, loras, tmp_path):
    """A LoRA for another model's shapes: one error line, exit 5, nothing written (diffusers logged the whole
    state-dict error on stderr before it), the same line as infer's; a LoRA that fits still writes."""
    repo = tmp_path / "repo"
    line = assert_refused(cli("serve", export_fp32, "--write-repository", repo, "--lora", loras["foreign"]), 5,
                          "other-model.safetensors", "size mismatch")
    assert not repo.exists() or not any(repo.iterdir())
    proc = cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "o.png", "--steps", 1, "--lora",
               loras["foreign"])
    assert assert_refused(proc, 5) == line and not (tmp_path / "o.png").exists()
    assert proc.stderr.strip() == line
    proc = cli("serve", export_fp32, "--write-repository", repo, "--lora", f"{loras['a']}:0.5")
    assert proc.returncode == 0, proc.stderr
    assert (repo / "sdexport" / "config.pbtxt").is_file()


def test_cli_infer_and_bench_with_lora(export_fp32, loras, tmp_path):
    result = run_cli("infer", export_fp32, "--prompt", "x", "-o", tmp_path / "i.png", "--steps", 2, "--lora",
                     f"{loras['a']}:0.8")
    assert result.exit_code == 0, result.stderr
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr  # transformers' bar
    meta = json.loads((tmp_path / "i.json").read_text())
    assert [lora["scale"] for lora in meta["loras_switched"]] == [0.8] and meta["loras_fused_at_export"] == []
    assert meta["lora_switch_ms"]["switch_ms"] > 0
    result = run_cli("bench", export_fp32, "--steps", 1, "--runs", 1, "--warmup", 0, "--no-eager", "--lora",
                     str(loras["b"]), "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    assert "LoRA switch median" in result.stdout and "base weights" in result.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    switch = report["results"][0]["lora_switch"]
    assert switch["switch_ms_median"] > 0 and 0 < switch["base_ms_median"] <= switch["fuse_ms_median"]


def test_quiet_loading_nests():
    """An inner quiet block (empty_module inside a LoRA load) leaves the outer one quiet, and the outer one
    restores the progress bars as they were (the inner one used to switch transformers' back on)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from sdexport.models import _quiet_loading

    for on in (True, False):
        for module in (dlog, tlog):
            module.enable_progress_bar() if on else module.disable_progress_bar()
        with _quiet_loading():
            with _quiet_loading():
                pass
            assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
        assert dlog.is_progress_bar_enabled() == on and tlog.is_progress_bar_enabled() == on
    dlog.enable_progress_bar()
    tlog.enable_progress_bar()


# --- TensorRT: refittable engines (up to the GPU boundary here; the rest under -m gpu) ----------------

@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx")


def test_refittable_weight_names_match_the_map(rtx, export_fp16):
    """The ONNX parser names TensorRT weights after the initializers: every initializer of the weights map is
    a weight TensorRT can mark refittable (what Refitter.set_named_weights will be called with)."""
    from sdexport.build import mark_refittable

    export = ExportDir.open(export_fp16)
    for component in ("unet", "text_encoder"):
        wmap = WeightMap(export, component)
        names = sorted({e["initializer"] for entries in wmap.params.values() for e in entries})
        log = rtx.Logger(rtx.Logger.ERROR)
        network = rtx.Builder(log).create_network(0)
        assert rtx.OnnxParser(network, log).parse_from_file(str(wmap.onnx_path))
        assert not any(network.are_weights_marked_refittable(n) for n in names)
        assert mark_refittable(rtx, network, names) == "REFIT_INDIVIDUAL"
        assert all(network.are_weights_marked_refittable(n) for n in names)
        with pytest.raises(IntegrityError, match="does not know"):
            mark_refittable(rtx, network, ["onnx::NotAWeight_0"])


def test_refit_takes_the_memory_mapped_base_weights(rtx, export_external, loras, monkeypatch):
    """A -> none on a TensorRT engine refits the file's values of what A changed: from an export with external
    data (every sd15 FP32 or SDXL UNet) those are the memory-mapped arrays, and TensorRT's Weights accepts them
    (it matches the numpy dtype by identity: an explicitly little-endian float32 was 'Could not implicitly
    convert NumPy data type: f32', found in review). Up to the GPU boundary: the refitter is a recording stub."""
    from sdexport.backends.trt import TrtEngine
    from sdexport.lora import fused_params

    export = ExportDir.open(export_external)
    wmap = WeightMap(export, "unet")
    refitted: dict[str, np.ndarray] = {}

    class Refitter:
        def get_all_weights(self):
            return sorted({e["initializer"] for entries in wmap.params.values() for e in entries})

        def set_named_weights(self, name, weights):
            refitted[name] = weights.numpy().copy()
            return True

    engine = TrtEngine.__new__(TrtEngine)
    engine.trt, engine.weight_map, engine._refitted, engine.device, engine.path = rtx, wmap, set(), "cpu", "unet"
    monkeypatch.setattr(engine, "_refitter", Refitter, raising=False)
    monkeypatch.setattr(engine, "_refit", lambda refitter, what: None, raising=False)
    values = fused_params(export.info, open_loras([f"{loras['b']}:1.0"]), ["unet"],
                          base=lambda part, name: wmap.base_param(name))
    engine.set_weights(values["unet"])
    assert refitted and engine._refitted == set(refitted)
    changed, refitted = dict(refitted), {}
    engine.set_weights({})  # back to the file's values
    assert set(refitted) == set(changed)
    for name, arr in refitted.items():  # TensorRT's Weights are flat
        np.testing.assert_array_equal(arr, wmap.base_initializer(name).reshape(-1))
        assert arr.dtype == wmap.base_initializer(name).dtype and not np.array_equal(arr, changed[name])


def test_refittable_build_without_a_gpu(rtx, export_fp16, tmp_path, monkeypatch):
    """TensorRT-RTX 1.7 builds refittable engines for one target, and only where CUDA runs: both are one
    line, and nothing is written. (With a GPU: test_refit_on_the_gpu.)"""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refittable build runs (test_refit_on_the_gpu)")
    out = tmp_path / "e"
    shutil.copytree(export_fp16, out, ignore=shutil.ignore_patterns("engines"))
    manifest = (out / "manifest.json").read_text()
    result = run_cli("build", out, "--refittable", "--components", "text_encoder")
    assert_error(result, 2, "one compute capability", "--compute-capability")
    result = run_cli("build", out, "--refittable", "--components", "text_encoder", "--compute-capability", "8.6")
    assert_error(result, 8, "only where CUDA runs")
    assert (out / "manifest.json").read_text() == manifest and not (out / "engines").exists()
    import sdexport.build as build_module

    with monkeypatch.context() as m:  # a GPU that cannot load the target's code (an H100 for 8.6: CUDA error 222)
        m.setattr(build_module, "_gpu_here", lambda: (9, 0))
        result = run_cli("build", out, "--refittable", "--components", "text_encoder", "--compute-capability", "8.6")
    assert_error(result, 8, "only on a GPU that can load its target's code", "compute capability 9.0", "8.6")
    assert (out / "manifest.json").read_text() == manifest and not (out / "engines").exists()
    result = run_cli("build", out, "--refittable", "--components", "vae_decoder", "--compute-capability", "8.6")
    assert result.exit_code == 0, result.stderr  # a component no LoRA changes is built as usual
    entry = load_manifest(out)["engines"]["vae_decoder"]
    assert entry["refittable"] is False and not entry["file"].endswith(".refit.plan")


def test_refittable_build_without_a_gpu_whatever_myelin_logs_first(rtx, export_fp16, tmp_path, monkeypatch):
    """Where no CUDA runs, a refittable TensorRT-RTX build cannot succeed, so it is exit 8 whichever error its
    compiler logs first. Under load on 2 cores it once logged graph_jit.cpp:179 "CHECK(status == myelinSuccess)"
    instead of the usual :278 "CHECK(status == CUDA_SUCCESS)", and the build said exit 9, "could not build"."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refittable build runs (test_refit_on_the_gpu)")
    from sdexport.backends.trt import capture_logger

    out = tmp_path / "e"
    shutil.copytree(export_fp16, out, ignore=shutil.ignore_patterns("engines"))
    manifest = (out / "manifest.json").read_text()
    under_load = ("IBuilder::buildSerializedNetwork: Error Code 1: Myelin ([myelin_graph.h:1295: attachExceptionMsgToGraph] "
                  "MyelinCheckException: graph_jit.cpp:179: CHECK(status == myelinSuccess) failed. In compileGraph at "
                  "/_src/optimizer/myelin/codeGenerator.cpp:2012)")
    monkeypatch.setattr(capture_logger(rtx), "summary", lambda default="": under_load)
    result = run_cli("build", out, "--refittable", "--components", "text_encoder", "--compute-capability", "8.6")
    assert_error(result, 8, "only where CUDA runs", "graph_jit.cpp:179")
    assert (out / "manifest.json").read_text() == manifest and not (out / "engines").exists()


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@NEEDS_GPU
def test_refit_on_the_gpu(export_fp16, loras, tmp_path):
    """Refittable, weight-stripped engines: smaller plans; A -> B -> A -> none by refit gives exactly the
    images it gave before, and the ORT engines' images for the same LoRAs (FP16)."""
    from sdexport.backends.trt import gpu_capability, trt_status
    from sdexport.build import build

    cc = "{}.{}".format(*gpu_capability())
    if not trt_status(gpu_capability())["can_run"]:
        pytest.skip(f"no TensorRT here that runs on compute capability {cc}")
    out = tmp_path / "e"
    shutil.copytree(export_fp16, out, ignore=shutil.ignore_patterns("engines"))
    build(out, precision="fp16", components=["unet"], compute_capabilities=cc, force=True)
    plain = load_manifest(out)["engines"]["unet"]["size_bytes"]
    build(out, precision="fp16", compute_capabilities=cc, refittable=True, force=True)
    entry = load_manifest(out)["engines"]["unet"]
    assert entry["refittable"] and entry["file"].endswith(".refit.plan")
    if entry["weights_stripped"]:
        assert entry["size_bytes"] < plain, (entry["size_bytes"], plain)
    export = ExportDir.open(out)
    request = {**REQUEST, "height": 128, "width": 128}
    pipes = {b: Pipeline(load_engines(export, b, device="cuda"), export, device="cuda") for b in ("trt", "ort")}
    seen: dict[tuple, np.ndarray] = {}
    for state in [(("a", 0.8),), (("b", 1.0),), (("a", 0.8),), ()]:
        images = {}
        for backend, pipe in pipes.items():
            print(backend, state, pipe.set_loras([f"{loras[k]}:{s}" for k, s in state]))
            images[backend] = pipe(**request).images
        assert psnr(images["trt"], images["ort"]) >= 30, state
        if state in seen:
            np.testing.assert_array_equal(images["trt"], seen[state])
        seen[state] = images["trt"]


@pytest.mark.gpu
@NEEDS_GPU
def test_switching_on_cuda_ort(export_fp32, loras):
    """ONNX Runtime's CUDA EP takes the replaced initializers too: the switched CUDA image equals the CPU one
    (FP32, TF32 off) and a repeated state repeats exactly."""
    export = ExportDir.open(export_fp32)
    cpu = Pipeline(load_engines(export, "ort"), export)
    cuda = Pipeline(load_engines(export, "ort", device="cuda", tf32=False, variant="plain"), export, device="cuda")
    seen = {}
    for state in [(("a", 0.8),), (), (("a", 0.8),)]:
        args = [f"{loras[k]}:{s}" for k, s in state]
        cpu.set_loras(args)
        print("ort cuda", state, cuda.set_loras(args))
        image = cuda(**REQUEST).images
        assert psnr(image, cpu(**REQUEST).images) >= 40.0, state
        if state in seen:
            np.testing.assert_array_equal(image, seen[state])
        seen[state] = image


def test_pytorch_reference_of_a_fused_export_has_the_loras(fused_export, loras, tmp_path):
    """validate and --backend torch compare against the source model with the recorded LoRAs fused (else a
    LoRA export would fail validation); a recorded LoRA file that changed is one line, exit 5."""
    from sdexport.validate import validate

    report = validate(fused_export, components=["text_encoder", "unet"])
    assert report["passed"], [r for r in report["results"] if not r["pass"]]
    export = ExportDir.open(fused_export)
    ours = Pipeline(load_engines(export, "ort"), export)(**REQUEST).images
    assert psnr(Pipeline(load_engines(export, "torch"), export)(**REQUEST).images, ours) >= 40.0
    copy = tmp_path / "e"
    shutil.copytree(fused_export, copy)
    data = load_manifest(copy)
    data["model"]["loras"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(data))
    assert_error(run_cli("validate", copy, "--components", "unet"), 5, "the LoRA fused into", "changed")
