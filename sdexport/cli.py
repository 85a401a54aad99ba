"""The ``sdexport`` command line: parse, call one function, print. No logic lives here.

Every error a user can cause is an ``SdexportError``: one line on stderr and its
exit code (errors.py). Click's own usage errors are shortened to one line too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import click  # noqa: E402

from . import __version__  # noqa: E402
from . import interrupts, limits  # noqa: E402
from .errors import SdexportError  # noqa: E402

from .families import all_options, default_strengths  # noqa: E402
from .pipeline import SCHEDULERS  # noqa: E402

SCHEDULER_NAMES = tuple(SCHEDULERS)
DEVICE_HELP = "auto (CUDA where a GPU is visible, else CPU), cpu, cuda or cuda:N."
BACKEND_HELP = ("ort: the ONNX graphs in ONNX Runtime; trt: the TensorRT engines of 'sdexport build'; inductor: "
                "the AOTInductor packages of 'sdexport build --backend inductor'; torch: the source model's own "
                "PyTorch modules, eager (the reference, no engine; needs the source model)")
MODEL_HELP = ("The source model directory, when it moved since the export (checked against the weights hash "
              "in the manifest). Default: the path the manifest records.")


def say(msg: str) -> None:
    click.echo(msg, err=True)


def _device(device: str) -> str:
    return limits.device("--device", device)


def checked(check, *args):
    """A click callback running one of limits' checks on an option's value while the command line is
    parsed, so a bad value is refused before anything loads (a value left out stays None)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        return check(max(param.opts, key=len), value, *args)
    return callback


def _fail(exc: SdexportError):
    interrupts.done()  # the command ends here, with this line and code (a later Ctrl-C changes nothing)
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _interrupted(signum: int | None) -> None:
    import signal

    interrupts.done()  # one line and 130/143, also when Ctrl-C is pressed again while the process shuts down
    name = signal.Signals(signum).name if signum else "SIGINT"
    done = interrupts.committed_so_far()
    if done:  # the interrupt came after the commit point: the result is whole, the exit status still says 130/143
        click.echo(f"interrupted ({name}) after {'; '.join(done)} (committed before the interrupt: complete)",
                   err=True)
    else:
        click.echo(f"interrupted ({name}); nothing partial was left under a final name", err=True)
    sys.exit(128 + (signum or signal.SIGINT))


def handled(func):
    """Run a command body; turn our errors into one line and an exit code. SIGINT and SIGTERM end the
    command with 128 + signal (130, 143), also when their exception was swallowed inside a library.
    A full disk reaches us from any writer, often as a library's own exception: one line, exit 10."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import warnings

        from .paths import OUTPUTS

        interrupts.install()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            result = func(*args, **kwargs)
        except SdexportError as exc:
            if interrupts.received():
                _interrupted(interrupts.received())
            _fail(exc)
        except KeyboardInterrupt:
            _interrupted(interrupts.received())
        except Exception as exc:
            if interrupts.received():
                _interrupted(interrupts.received())
            message = limits.disk_full_message(exc, OUTPUTS)
            if message is None:
                raise
            _fail(limits.DiskFull(message))
        if interrupts.received():
            _interrupted(interrupts.received())
        interrupts.done()  # the result is printed: a signal while the process shuts down leaves its exit status
        return result
    return wrapper


def reading(export_dir):
    """Hold the export's lock shared for a reading command (a writer waits; we wait for a writer)."""
    from .manifest import reading as lock

    return lock(export_dir, say) if os.path.isdir(export_dir) else contextlib.nullcontext()


def family_options(command):
    """Every model family's request options (SDXL micro-conditioning, ...); each model accepts its own
    (``Family.check_options``: another family's option is exit 2 naming the models that take it)."""
    for opt in reversed(list(all_options().values())):
        # the bounds while parsing, as for every other option: before the export is even looked for
        bounded = (lambda o: lambda ctx, param, value: None if value is None else o.check(value))(opt)
        if opt.kind == "score":
            command = click.option(opt.flag, opt.name, type=float, default=None, help=opt.help,
                                   callback=bounded)(command)
        else:
            command = click.option(opt.flag, opt.name, type=int, nargs=2, default=None, help=opt.help,
                                   metavar="H W" if opt.kind == "size" else "TOP LEFT", callback=bounded)(command)
    return command


class OneLineErrors(click.Group):
    """Click prints usage errors as a usage block; sdexport prints one line (``error: ...``), exit 2.
    Errors raised while parsing (the option checks) get their own exit code the same way."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        for stream in (sys.stdout, sys.stderr):  # paths from argv that are not UTF-8 print back as they came
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="surrogateescape")
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # a KeyboardInterrupt outside a command body (e.g. right after it returned)
            _interrupted(interrupts.received())
        except click.ClickException as exc:
            interrupts.done()
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except SdexportError as exc:
            _fail(exc)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sdexport")
def cli():
    """Stable Diffusion (diffusers layout) -> validated ONNX / TensorRT engines.

    \b
    The usual workflow:
      sdexport export MODEL -o OUT            # MODEL: a diffusers directory or a preset (tiny)
      sdexport validate OUT                   # every component against PyTorch; exit 6 if one misses
      sdexport infer OUT --prompt "a fox" -o fox.png
      sdexport bench OUT --json bench.json    # engines next to PyTorch eager
    TensorRT: sdexport build OUT, then --backend trt. INT8: sdexport calibrate, then sdexport quantize.
    Errors: one line 'error: ...' on stderr and an exit code (2 usage, 3 model, 4 shape, 5 integrity,
    6 validation failed, 7 backend missing, 8 cannot run here, 9 TensorRT build failed, 10 disk full,
    11 server stopped, 130 or 143 interrupted); see the README.
    """


@cli.command()
@click.argument("name")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Directory to write: new, empty, or this preset written before (never another directory's "
                   "contents, which are refused rather than replaced).")
@handled
def preset(name, out):
    """Write a built-in preset (tiny, sd15-random, sdxl-tiny, sdxl-random) as a diffusers model directory."""
    from .models import write_preset

    path = write_preset(name, out, progress=say)
    click.echo(str(path))


@cli.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Export directory: new, empty, or an earlier export (updated in place); never the model "
                   "directory, inside it, or around it.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: mixed precision, normalizations/softmax/resize/time embedding kept FP32.")
@click.option("--opset", type=int, default=17, show_default=True, callback=checked(limits.count, 14, 21),
              help="ONNX opset of the graphs, 14 to 21.")
@click.option("--components", default=None,
              help="Comma-separated subset to export (default: every component of the model: text_encoder, "
                   "unet, vae_decoder, vae_encoder; SDXL adds text_encoder_2, a refiner has only that one).")
@click.option("--max-batch", type=int, default=4, show_default=True,
              callback=checked(limits.count, 1, limits.MAX_EXPORT_IMAGES), help="Most images per call.")
@click.option("--min-size", type=int, default=None, callback=checked(limits.count, 1),
              help="Smallest image side in pixels (default: half native).")
@click.option("--max-size", type=int, default=None, callback=checked(limits.count, 1),
              help=f"Largest image side in pixels (default: twice native, 1.5x for SDXL; at most "
                   f"{limits.MAX_SIDE_FACTOR}x native).")
@click.option("--force", is_flag=True, help="Re-export even if nothing changed; needed to replace another "
              "export, or to drop the engines built from a component this re-export rewrites.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse this LoRA (diffusers/PEFT or kohya/A1111 file) into the exported weights; repeatable.")
@handled
def export(model, out, dtype, opset, components, max_batch, min_size, max_size, force, loras):
    """Export MODEL (a diffusers directory or preset name) to ONNX in Optimum's layout."""
    from .export import export as run

    run(model, out, dtype=dtype, opset=opset, components=[c.strip() for c in (components or "").split(",") if c.strip()],
        max_images=max_batch, min_size=min_size, max_size=max_size, force=force, loras=list(loras), say=say)
    click.echo(f"{out}/manifest.json")


# What each `build --backend` reads of build's options (None: all of them); another given option is refused
# rather than silently ignored (a user asking for --refittable or --static must not get something else).
BUILD_BACKEND_OPTIONS = {"trt": None, "ort": ("components",),
                         "inductor": ("precision", "components", "static", "batch", "max_batch", "device", "force")}


def _check_backend_options(ctx, backend: str) -> None:
    from click.core import ParameterSource

    from .errors import UsageError

    takes = BUILD_BACKEND_OPTIONS[backend]
    if takes is None:
        return
    for param in ctx.command.params:
        if param.name in ("export_dir", "engine_backend") or param.name in takes:
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            flags = [p.opts[0] for p in ctx.command.params if p.name in takes]
            raise UsageError(f"{param.opts[0]}: not an option of build --backend {backend} "
                             f"(it takes {', '.join(flags)})")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8"]), default=None,
              help="Which export to build; must match the graph (fp16: an export made with --dtype fp16; "
                   "int8: the quantized UNet + fp16 rest). Default: fp16. inductor: the packages' precision, "
                   "fp16 or fp32 (fp32 on the CPU), whatever the export's; default: the --device's, fp16 on cuda, "
                   "fp32 on cpu.")
@click.option("--trt", "flavour", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto", show_default=True,
              help="auto: tensorrt where a GPU is visible, else TensorRT-RTX.")
@click.option("--components", default=None, help="Comma-separated subset (default: all exported).")
@click.option("--compute-capability", "ccs", default=None,
              help="TensorRT-RTX targets, e.g. 8.0,8.6 (default 8.0,8.6,8.9,12.0; T4 needs 7.5).")
@click.option("--static", default=None, metavar="HxW",
              help="One static image size (for CUDA graphs and peak speed); inductor: required.")
@click.option("--batch", type=int, default=None, callback=checked(limits.count, 1),
              help="Images per call of a --static engine or Inductor package (default 1).")
@click.option("--min-size", default=None, metavar="HxW", help="Profile min image size (default: the export's).")
@click.option("--opt-size", default=None, metavar="HxW", help="Profile opt image size (default: native).")
@click.option("--max-size", default=None, metavar="HxW", help="Profile max image size (default: the export's).")
@click.option("--opt-batch", type=int, default=None, callback=checked(limits.count, 1),
              help="Profile opt images per call (default 1).")
@click.option("--max-batch", type=int, default=None, callback=checked(limits.count, 1),
              help="Profile max images per call (default: the export's); inductor: with --static, one "
                   "package for any batch of 1..N images (a dynamic batch axis) instead of --batch N.")
@click.option("--opt-level", type=int, default=3, show_default=True, callback=checked(limits.count, 0, 5),
              help="Builder optimization level, 0-5.")
@click.option("--workspace", type=int, default=None, callback=checked(limits.count, 1, 2**22),
              help="Workspace limit in MiB (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file (default OUT/engines/timing.<trt>.cache; not used by TensorRT-RTX).")
@click.option("--backend", "engine_backend", type=click.Choice(["trt", "ort", "inductor"]), default="trt",
              show_default=True,
              help="ort: prepare the ONNX Runtime CUDA variant (fusions + FP16) instead of TensorRT engines; "
                   "inductor: AOTInductor packages compiled for --static HxW on --device.")
@click.option("--device", default=None,
              help="trt: cuda:N, the GPU that NVIDIA's tensorrt builds for and whose compute capability is checked "
                   "(default: the current CUDA device); inductor: the device to compile for (cpu or cuda[:N], "
                   "default: cuda where there is one).")
@click.option("--force", is_flag=True, help="Rebuild even if nothing changed.")
@click.option("--refittable", is_flag=True,
              help="Keep the weights a LoRA changes refittable (weight-stripped where the flavour can): "
                   "'infer --lora' then refits instead of rebuilding.")
@handled
def build(export_dir, precision, flavour, components, ccs, static, batch, min_size, opt_size, max_size, opt_batch,
          max_batch, opt_level, workspace, timing_cache, engine_backend, device, force, refittable):
    """Build engines for EXPORT_DIR: TensorRT (default; EXPORT_DIR/engines/), the ONNX Runtime CUDA variant
    (--backend ort; ort_cuda/) or AOTInductor packages (--backend inductor; inductor/)."""
    from .build import build as run

    _check_backend_options(click.get_current_context(), engine_backend)
    if engine_backend == "inductor":
        from .inductor import build as compile_packages

        parts = [c.strip() for c in components.split(",") if c.strip()] if components else None
        report = compile_packages(export_dir, static, batch=batch, components=parts, precision=precision,
                                  device=_device(device or "auto"), force=force, max_batch=max_batch, say=say)
        cc = f" sm{report['compute_capability']}" if report["compute_capability"] else ""
        click.echo(_build_summary(export_dir, report, "Inductor package(s)",
                                  f" ({report['precision']}, {report['device']}{cc})"))
        return

    if engine_backend == "ort":
        from .ort_cuda import prepare

        parts = [c.strip() for c in components.split(",") if c.strip()] if components else None
        report = prepare(export_dir, **({"components": parts} if parts else {}), say=say)
        click.echo(_build_summary(export_dir, report, "ONNX Runtime CUDA variant(s)"))
        return

    report = run(export_dir, precision=precision or "fp16", flavour=flavour,
                 components=[c.strip() for c in components.split(",") if c.strip()] if components else None,
                 compute_capabilities=ccs, static=static, batch=batch, min_size=min_size, opt_size=opt_size,
                 max_size=max_size, opt_batch=opt_batch, max_batch=max_batch, opt_level=opt_level,
                 workspace_mib=workspace, timing_cache=timing_cache, force=force, device=device,
                 refittable=refittable, say=say)
    click.echo(_build_summary(export_dir, report, "TensorRT engine(s)", f" ({report['flavour']} {report['version']}, "
                              f"compute capability {', '.join(report['targets'])})"))


def _build_summary(export_dir, report, what: str, detail: str = "") -> str:
    """build's last line, the same for every backend: what this command built, and what the export holds."""
    held = report["held"]
    return (f"{export_dir}/manifest.json: {len(report['built'])} built, {len(report['up_to_date'])} up to date"
            f"{detail}; the export holds {len(held)} {what}{': ' + ', '.join(held) if held else ''}")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "trt", "inductor"]), default="ort", show_default=True,
              help="What is compared with PyTorch: ort, the ONNX graphs in ONNX Runtime; trt, the TensorRT "
                   "engines of 'sdexport build' (also against ONNX Runtime); inductor, the AOTInductor packages.")
@click.option("--device", default="auto", show_default=True, callback=checked(limits.device_name), help=DEVICE_HELP)
@click.option("--components", default=None, help="Comma-separated subset (default: all exported).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@handled
def validate(export_dir, backend, device, components, model_dir):
    """Compare every component with PyTorch eager at shapes across the dynamic range."""
    from .errors import ValidationFailed
    from .validate import validate as run

    with reading(export_dir):
        report = run(export_dir, backend=backend, device=_device(device),
                     components=components.split(",") if components else None, say=say, model_dir=model_dir)
    click.echo(f"{export_dir}/validation.json: {'PASSED' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        failed = sorted({r["component"] for r in report["results"] if not r["pass"]})
        if not report.get("int8", {}).get("passed", True):
            failed.append("unet_int8 (INT8 report)")
        raise ValidationFailed(f"{', '.join(failed)} missed the thresholds; see {export_dir}/validation.json")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", required=True, callback=checked(limits.text),
              help=f"What to draw (UTF-8, at most {limits.MAX_PROMPT_CHARS:,} characters; past the text encoder's "
                   "77 tokens it is truncated, with a warning naming the dropped words).")
@click.option("--negative-prompt", default=None, callback=checked(limits.text),
              help="What the image should not show (default: none; used with guidance above 1).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Output PNG path. A batch writes FILE-0.png, FILE-1.png, ...; the sidecar FILE.json holds "
                   "the settings and timings. Never onto a file of the export.")
@click.option("--steps", type=int, default=None, callback=checked(limits.count, 1, limits.MAX_STEPS),
              help="Denoising steps (default 30; 4 for LCM models; at most the scheduler's num_train_timesteps).")
@click.option("--guidance-scale", type=float, default=None, callback=checked(limits.guidance),
              help=f"Classifier-free guidance, 0 to {limits.MAX_GUIDANCE:g}; above 1 the negative prompt is used "
                   "(default: diffusers' for the model: 7.5 SD, 5.0 SDXL; LCM models take it as their guidance "
                   "embedding, default 8.5; use 0 for Turbo models).")
@click.option("--seed", type=int, default=0, show_default=True, callback=checked(limits.seed),
              help="Seed of the initial noise (0 to 2^64-1; the same image StableDiffusionPipeline gives with "
                   "torch.Generator('cpu').manual_seed(SEED)).")
@click.option("--height", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--batch-size", type=int, default=1, show_default=True, callback=checked(limits.count, 1),
              help="Images per call (at most the export's --max-batch).")
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None,
              help="Default: the model's own scheduler.")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt", "inductor"]), default="ort", show_default=True,
              help=BACKEND_HELP)
@click.option("--device", default="auto", show_default=True, callback=checked(limits.device_name), help=DEVICE_HELP)
@click.option("--unet", type=click.Choice(["default", "int8"]), default="default", show_default=True,
              help="int8: run the INT8 UNet written by 'sdexport quantize'.")
@click.option("--cuda-graph", is_flag=True,
              help="Capture the UNet call as a CUDA graph for this request's shape (GPU only).")
@click.option("--step-graph", is_flag=True,
              help="Capture each whole denoising step (UNet, guidance, scheduler update) as a CUDA graph for "
                   "this request's shape (GPU only; fastest path; falls back to the eager loop with a warning "
                   "for schedulers that draw host-side noise).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="--backend torch: " + MODEL_HELP)
@click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None,
              help="Start from this image: image-to-image (its size unless --height/--width), or inpainting "
                   "with --mask.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="Inpainting mask (grayscale, same size as --image; white = repaint). Inpainting models only.")
@click.option("--strength", type=float, default=None,
              help=f"How much of --image is repainted, in (0, 1] (default: diffusers' for the model: "
                   f"{default_strengths()}).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Switch this LoRA onto the engines (no re-export or rebuild; TensorRT: --refittable engines); "
                   "repeatable.")
@family_options
@handled
def infer(export_dir, prompt, negative_prompt, out, steps, guidance_scale, seed, height, width, batch_size,
          scheduler, backend, device, unet, cuda_graph, step_graph, model_dir, image_path, mask_path, strength,
          loras, **request_options):
    """Generate image(s) with the engines of EXPORT_DIR; writes PNG(s) and a JSON sidecar."""
    from .lora import open_loras

    lora_files = open_loras(loras)
    with reading(export_dir):
        image, mask = _request_images(image_path, mask_path)
        _infer(export_dir, prompt, negative_prompt, out, steps, guidance_scale, seed, height, width, batch_size,
               scheduler, backend, device, unet, cuda_graph, step_graph, model_dir, request_options, image, mask,
               strength, {"image": image_path, "mask": mask_path}, lora_files)


def _request_images(image_path, mask_path):
    """infer's and bench's --image and --mask, decoded; one over limits.MAX_INPUT_PIXELS (serve's rule too) is
    refused from its header, before decoding."""
    from .pipeline import load_image

    return tuple(load_image(path, flag) if path else None
                 for flag, path in (("--image", image_path), ("--mask", mask_path)))


def _infer(export_dir, prompt, negative_prompt, out, steps, guidance_scale, seed, height, width, batch_size,
           scheduler, backend, device, unet, cuda_graph, step_graph, model_dir, request_options, image=None,
           mask=None, strength=None, inputs=None, loras=()):
    from tqdm import tqdm

    from .backends import load_engines
    from .components import Geometry
    from .errors import UsageError
    from .limits import check_schedule
    from .paths import check_infer_outputs, request_inputs
    from .pipeline import InitImage, Pipeline, check_request, save_images
    from .runtime import ExportDir

    export = ExportDir.open(export_dir, model=model_dir)
    family, info = export.family, export.info
    if image is None:
        family.check_text_to_image(info)  # before any engine is loaded
    request_options = family.check_options(info, request_options)
    if guidance_scale is not None and family.guidance_note(info, guidance_scale):
        say(f"note: {family.guidance_note(info, guidance_scale)}")
    steps, guidance_scale = family.request_settings(info, steps, guidance_scale)
    if (cuda_graph or step_graph) and not device.startswith(("cuda", "auto")):
        raise UsageError(f"--{'step' if step_graph else 'cuda'}-graph needs a CUDA device (--device cuda)")
    init = InitImage.for_request(export, image, mask, strength, height, width)  # before any engine is loaded
    if init is not None:
        init.check_steps(steps)
        if init.height:  # image-to-image keeps the image's size (rounded as diffusers does)
            height, width = init.height, init.width
    geo = Geometry(batch_size, export.ranges.opt_size if height is None else height,
                   export.ranges.opt_size if width is None else width,
                   guidance=export.family.guidance(export.info, guidance_scale).cfg)
    check_request(export.ranges, steps, guidance_scale, geo, export.info.scheduler_config)
    check_infer_outputs(export, out, geo, model_dir if backend == "torch" else None,
                        request_inputs(**{k: v for k, v in (inputs or {}).items() if v}, loras=loras))
    check_schedule(scheduler, export.info.scheduler_config, steps)
    if backend == "torch":
        export.source_model()  # the PyTorch modules come from the source model: find it before any work
    device = _device(device)
    options: dict = {"unet": unet} if unet != "default" else {}
    if cuda_graph or step_graph:
        if not device.startswith("cuda"):
            raise UsageError(f"--{'step' if step_graph else 'cuda'}-graph needs a CUDA device (--device cuda)")
        # --step-graph: the pipeline captures whole steps (the engine must not capture its own graph)
        options.update(cuda_graph=not step_graph, **({"static": geo} if backend == "ort" else {}))
    if loras:
        from .lora import engine_options

        options.update(engine_options(backend))
    engines = load_engines(export, backend, components=export.components_for(image is not None),
                           device=device, **options)
    pipe = Pipeline(engines, export, device=device, warn=lambda m: say(f"warning: {m}"), step_graph=step_graph)
    switch = None
    if loras:
        from .lora import describe

        switch = pipe.set_loras(loras)
        say(f"LoRA {describe(list(loras))} switched onto the engines in {switch['switch_ms']:.0f} ms "
            f"(fuse {switch['fuse_ms']:.0f}, apply {switch['apply_ms']:.0f})")
    bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, leave=False, disable=None)
    result = pipe(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
                  height=height, width=width, batch_size=batch_size, scheduler=scheduler, image=image, mask=mask,
                  strength=strength, progress=lambda i, n: (setattr(bar, "total", n), bar.update(1)),
                  **request_options)
    bar.close()
    summary = result.stage_summary()
    meta = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
            "scheduler": scheduler or result.scheduler, "guidance_scale": guidance_scale,
            "height": result.images.shape[1], "width": result.images.shape[2], "batch_size": batch_size,
            "backend": backend, "unet": unet, "device": device, "export": str(export.root),
            "prompt_truncated": result.truncated, "loop": result.loop, "mode": result.mode,
            **({"options": {k: list(v) if isinstance(v, tuple) else v for k, v in request_options.items()}}
               if request_options else {}),
            "loras_fused_at_export": export.manifest.data["model"].get("loras", []),
            "loras_switched": [lora.to_json() for lora in loras],
            **({"lora_switch_ms": {k: round(v, 3) for k, v in switch.items()}} if switch else {}),
            **({"image": (inputs or {}).get("image"), "mask": (inputs or {}).get("mask"), "strength": result.strength}
               if image is not None else {}),
            "timings_ms": {k: round(v, 3) for k, v in summary.items()}}
    names = save_images(result, out, meta)
    encode = (f"image preprocessing {summary['image_preprocess_ms']:.1f}, VAE encode {summary['vae_encoder_ms']:.1f}, "
              if summary["vae_encoder_ms"] else "")
    say(f"{backend} on {device}: total {summary['total_ms']:.1f} ms ({encode}text {summary['text_encoder_ms']:.1f}, "
        f"UNet x{summary['unet_steps']} {summary['unet_total_ms']:.1f}, VAE {summary['vae_decoder_ms']:.1f}, "
        f"loop overhead {summary['loop_overhead_ms']:.1f})")
    for name in names:
        click.echo(name)


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "torch", "trt", "inductor"]), default="ort", show_default=True,
              help=BACKEND_HELP + "; PyTorch eager is timed after it unless --no-eager.")
@click.option("--device", default="auto", show_default=True, callback=checked(limits.device_name), help=DEVICE_HELP)
@click.option("--steps", type=int, default=None, callback=checked(limits.count, 1, limits.MAX_STEPS),
              help="Denoising steps per run (default: infer's for the model: 30; 4 for LCM models).")
@click.option("--height", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--batch-size", type=int, default=1, show_default=True, callback=checked(limits.count, 1),
              help="Images per run (at most the export's --max-batch).")
@click.option("--guidance-scale", type=float, default=None, callback=checked(limits.guidance),
              help="Classifier-free guidance; above 1 the UNet sees two rows per image (default: infer's for the "
                   "model: 7.5 SD, 5.0 SDXL, 8.5 as an LCM model's guidance embedding).")
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None,
              help="Default: the model's own scheduler (bench.json records the one used).")
@click.option("--runs", type=int, default=3, show_default=True, callback=checked(limits.count, 1, limits.MAX_RUNS),
              help="Timed runs (median reported).")
@click.option("--warmup", type=int, default=1, show_default=True, callback=checked(limits.count, 0, limits.MAX_WARMUP),
              help="Untimed runs first.")
@click.option("--threads", type=int, default=None, callback=checked(limits.count, 1, limits.MAX_THREADS),
              help="CPU threads for PyTorch and ONNX Runtime (default: the cores this process may use); "
                   "recorded in bench.json.")
@click.option("--eager-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision of the PyTorch eager baseline.")
@click.option("--no-eager", is_flag=True, help="Skip the PyTorch eager comparison.")
@click.option("--cuda-graph", is_flag=True, help="Capture the UNet call as a CUDA graph (static shape; GPU only).")
@click.option("--step-graph", is_flag=True,
              help="Capture each whole denoising step as a CUDA graph (static shape; GPU only).")
@click.option("--torch-compile", is_flag=True, help="--backend torch: wrap the modules in torch.compile.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the figures, machine, versions and command here (never onto a file of the export).")
@click.option("--unet", type=click.Choice(["default", "int8"]), default="default", show_default=True,
              help="int8: time the INT8 UNet written by 'sdexport quantize' (eager stays FP32/--eager-dtype).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help=MODEL_HELP)
@click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None,
              help="Time image-to-image from this image (inpainting with --mask); adds the VAE-encode stage.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None, help="Inpainting mask.")
@click.option("--strength", type=float, default=None,
              help=f"With --image: in (0, 1] (default: {default_strengths()}).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Switch this LoRA onto the engines first (repeatable); reports the switch time.")
@handled
def bench(export_dir, backend, device, steps, height, width, batch_size, guidance_scale, scheduler, runs, warmup,
          threads, eager_dtype, no_eager, cuda_graph, step_graph, torch_compile, json_path, unet, model_dir,
          image_path, mask_path, strength, loras):
    """Time the engines against PyTorch eager on the same shapes, in one run."""
    from .bench import bench as run
    from .bench import format_table
    from .errors import UsageError
    from .manifest import write_json
    from .lora import open_loras
    from .paths import request_inputs

    lora_files = open_loras(loras)
    for flag, on in (("--cuda-graph", cuda_graph), ("--step-graph", step_graph)):
        if on and device == "cpu":
            raise UsageError(f"{flag} needs a CUDA device (--device cuda)")
    with reading(export_dir):
        image, mask = _request_images(image_path, mask_path)
        report = run(export_dir, backend=backend, device=device, steps=steps, height=height, width=width,
                     batch_size=batch_size, guidance_scale=guidance_scale, scheduler=scheduler, runs=runs,
                     warmup=warmup, eager_dtype=eager_dtype, compare_eager=not no_eager, say=say,
                     cuda_graph=cuda_graph, step_graph=step_graph, torch_compile=torch_compile, threads=threads,
                     json_path=json_path, model_dir=model_dir, image=image, mask=mask, strength=strength,
                     loras=lora_files, inputs=request_inputs(image_path, mask_path, lora_files), **({"unet": unet} if unet != "default" else {}))
    click.echo(format_table(report))
    if json_path:
        write_json(json_path, report)
        click.echo(json_path)


@cli.command()
@click.argument("model")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Prompt file, one per line; '#' comments and blank lines skipped "
                   f"(default: the 362 prompts sdexport ships, sdexport/data/prompts.txt; at most {limits.MAX_PROMPT_FILE_BYTES // 2**20} MiB and "
                   f"{limits.MAX_PROMPT_FILE_LINES:,} lines).")
@click.option("--num-prompts", type=int, default=64, show_default=True,
              callback=checked(limits.count, 1, limits.MAX_PROMPT_FILE_LINES),
              help="Distinct prompts drawn from the file.")
@click.option("--steps", type=int, default=None, callback=checked(limits.count, 1, limits.MAX_STEPS),
              help="Denoising steps per prompt (default: infer's for the model: 30; 4 for LCM models).")
@click.option("--max-samples", type=int, default=512, show_default=True,
              callback=checked(limits.count, 1, limits.MAX_SAMPLES),
              help="UNet input rows kept (reservoir sampling; two rows per step with guidance).")
@click.option("--guidance-scale", type=float, default=None, callback=checked(limits.guidance),
              help="Classifier-free guidance, as at inference (default: infer's for the model: 7.5 SD, 5.0 SDXL, "
                   "8.5 LCM).")
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None,
              help="Default: the model's own scheduler.")
@click.option("--height", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, callback=checked(limits.count, 1),
              help="Pixels (default: the model's native size).")
@click.option("--seed", type=int, default=0, show_default=True, callback=checked(limits.seed),
              help="Prompt draw and latent noise (prompt i uses SEED + i).")
@click.option("--negative-prompt", default="", show_default=True, callback=checked(limits.text),
              help="Negative prompt for every run, as at inference.")
@click.option("--device", default="auto", show_default=True, callback=checked(limits.device_name), help=DEVICE_HELP)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Calibration file, named *.npz; never the prompt file or a file of the model.")
@handled
def calibrate(model, prompts_file, num_prompts, steps, max_samples, guidance_scale, scheduler, height, width, seed,
              negative_prompt, device, out):
    """Record the UNet's inputs at every denoising step of the PyTorch pipeline (INT8 calibration)."""
    from .calibration import DEFAULT_PROMPTS, calibrate as run

    meta = run(model, out, prompts_file=prompts_file or DEFAULT_PROMPTS, num_prompts=num_prompts, steps=steps,
               max_samples=max_samples, guidance_scale=guidance_scale, scheduler=scheduler, height=height,
               width=width, seed=seed, negative_prompt=negative_prompt, device=device, say=say)
    click.echo(f"{out}: {meta['samples']} samples of {meta['rows_seen']} UNet input rows")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--calib", required=True, type=click.Path(dir_okay=False), help="File written by 'sdexport calibrate'.")
@click.option("--precision", type=click.Choice(["int8"]), default="int8", show_default=True,
              help="Quantized precision of the UNet (INT8 is the one there is).")
@click.option("--calibration-method", type=click.Choice(["max", "entropy", "percentile"]), default="max",
              show_default=True, help="percentile runs on ONNX Runtime's quantizer (ModelOpt has max and entropy).")
@click.option("--quantizer", type=click.Choice(["auto", "modelopt", "ort"]), default="auto", show_default=True,
              help="auto: NVIDIA ModelOpt, falling back to ONNX Runtime's quantize_static.")
@click.option("--exclude", multiple=True, metavar="REGEX",
              help="Keep matching Conv/MatMul/Gemm nodes out of INT8 (repeatable; added to the defaults).")
@click.option("--no-default-excludes", is_flag=True,
              help="Drop the default exclusions (time embedding, conv_in/out, shortcuts, attention scores).")
@click.option("--force", is_flag=True, help="Re-quantize even if nothing changed.")
@handled
def quantize(export_dir, calib, precision, calibration_method, quantizer, exclude, no_default_excludes, force):
    """Write EXPORT_DIR/unet_int8: the FP32 UNet as explicit INT8 Q/DQ ONNX (TensorRT placement), rest FP16."""
    from .quantize import quantize as run

    entry = run(export_dir, calib, precision=precision, method=calibration_method, quantizer=quantizer,
                exclude=exclude, default_excludes=not no_default_excludes, force=force, say=say)
    click.echo(f"{export_dir}/{entry['file']}")


class VerbatimEpilog(click.Command):
    """A command whose epilog is printed as written: click indents an epilog, and examples indented in the
    terminal no longer run when pasted (a shell's ``python3 -c`` block, a Python file)."""

    def format_epilog(self, ctx, formatter):
        if self.epilog:
            formatter.write_paragraph()
            formatter.write(self.epilog + "\n")


def _serve_epilog() -> str:
    from .serve import CLIENT_EXAMPLE, CURL_EXAMPLE

    return ("Example request (KServe v2 JSON over HTTP; writes image.png):\n\n" + CURL_EXAMPLE
            + "\n\nThe same with tritonclient:\n\n" + CLIENT_EXAMPLE)


def _ints(text: str | None) -> tuple[int, ...]:
    from .errors import UsageError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()
    except ValueError:
        raise UsageError(f"--gpus {text}: comma-separated GPU indices, e.g. 0,1") from None


@cli.command(cls=VerbatimEpilog, epilog=_serve_epilog())
@click.argument("export_dir", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "torch", "trt", "inductor"]), default="ort", show_default=True,
              help="The engines infer runs with this name.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the engines run: auto (CUDA where a GPU is visible), cpu or cuda (with --gpus: which GPUs).")
@click.option("--gpus", default=None, metavar="0,1,...",
              help="One model instance per listed GPU (default with cuda: GPU 0); Triton spreads requests.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Listen address (0.0.0.0: all interfaces).")
@click.option("--http-port", type=int, default=8000, show_default=True, help="Triton's HTTP/REST port (KServe v2).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="Triton's gRPC port (KServe v2).")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", type=int, default=None,
              help="Most images per pipeline call from concurrent requests (default: the export's maximum).")
@click.option("--max-queue-delay-ms", type=float, default=5.0, show_default=True,
              help="How long the dynamic batcher waits for more requests when a batch is not full.")
@click.option("--max-queue-size", type=int, default=32, show_default=True,
              help="Queued requests beyond this are rejected at once (503, 'Exceeds maximum queue size').")
@click.option("--warmup", multiple=True, metavar="HxW[xN]",
              help="Shape to run before reporting ready, N images per call (repeatable; default: native size). "
                   "Without N: one image, or with --step-graph every batch size up to --max-batch (each size "
                   "is its own step graph).")
@click.option("--warmup-steps", type=int, default=None,
              help="Steps of each warm-up run (default: 2; with --step-graph the default request's steps, so the "
                   "step graphs captured are the ones requests use: give the steps your clients send).")
@click.option("--scheduler", "default_scheduler", default=None,
              help="Scheduler of requests that name none, and of the warm-up (default: the model's own).")
@click.option("--text-cache-size", type=int, default=256, show_default=True,
              help="Prompt embeddings kept (LRU); 0 turns the cache off.")
@click.option("--step-graph", is_flag=True, help="Capture each denoising step as a CUDA graph (GPU only).")
@click.option("--model-name", default="sdexport", show_default=True,
              help="Name of the served model in the URLs (/v2/models/NAME) and in the written repository.")
@click.option("--drain-timeout-s", type=int, default=30, show_default=True,
              help="On SIGTERM/SIGINT: how long in-flight requests may take before the server exits.")
@click.option("--write-repository", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write a Triton model repository (config.pbtxt + model.py) for the official Triton container "
                   "into DIR and exit.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Serve with this LoRA switched onto the engines (no re-export or rebuild; repeatable). Every "
                   "request gets it; requests cannot switch LoRAs.")
@click.option("--unet", type=click.Choice(["default", "int8"]), default="default", show_default=True,
              help="int8: serve the INT8 UNet written by 'sdexport quantize' (as infer --unet int8).")
@handled
def serve(export_dir, backend, device, gpus, address, http_port, grpc_port, metrics_port, max_batch,
          max_queue_delay_ms, max_queue_size, warmup, warmup_steps, default_scheduler, text_cache_size, step_graph,
          model_name, drain_timeout_s, write_repository, loras, unet):
    """Serve EXPORT_DIR on NVIDIA Triton Inference Server (HTTP/gRPC, dynamic batching, metrics).

    Runs the tritonserver shipped in nvidia-pytriton until SIGTERM or Ctrl-C, which drain in-flight requests
    and exit 0. Prints one 'ready: URL' line on stdout once the engines are loaded and warmed up."""
    from .runtime import ExportDir
    from .serve import ServeOptions, parse_warmup, serve as run, write_repository as write

    gpu_list = _ints(gpus)
    if device == "auto":
        device = "cuda" if gpu_list else _device("auto")
    options = ServeOptions(export_dir=export_dir, backend=backend, device=device, gpus=gpu_list,
                           max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, max_queue_size=max_queue_size,
                           warmup=tuple(parse_warmup(w) for w in warmup) if warmup else None,
                           warmup_steps=warmup_steps, scheduler=default_scheduler, text_cache_size=text_cache_size,
                           step_graph=step_graph,
                           model_name=model_name, address=address, http_port=http_port, grpc_port=grpc_port,
                           metrics_port=metrics_port, drain_timeout_s=drain_timeout_s, loras=tuple(loras), unet=unet)
    with reading(export_dir):  # the export does not change under a running server (writers wait)
        if write_repository:
            export = ExportDir.open(export_dir)
            click.echo(str(write(options.resolved(export), write_repository, export)))
            return
        status = run(options, say=say, announce=lambda line: click.echo(line))
    sys.exit(status)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handled
def env(as_json):
    """What this host has: torch, CUDA, GPU, ONNX Runtime, TensorRT, Inductor's toolchain, Triton serving; what can
    build, run and serve here."""
    from .envinfo import describe, format_env

    report = describe()
    click.echo(json.dumps(report, indent=2) if as_json else format_env(report))


def main() -> None:
    interrupts.process_ends_with_command()
    cli.main(prog_name="sdexport")


if __name__ == "__main__":
    main()
