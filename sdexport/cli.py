"""The ``sdexport`` command line: parse, call one function, print. No logic lives here.

Every error a user can cause is an ``SdexportError``: one line on stderr and its
exit code (errors.py). Click's own usage errors are shortened to one line too.
"""

from __future__ import annotations

import functools
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import SdexportError  # noqa: E402

SCHEDULER_NAMES = ("ddim", "euler", "euler-a", "dpm++2m", "unipc", "pndm")


def say(msg: str) -> None:
    click.echo(msg, err=True)


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def handled(func):
    """Run a command body; turn our errors into one line and an exit code."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return func(*args, **kwargs)
        except SdexportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial artifact was left under a final name", err=True)
            sys.exit(130)
    return wrapper


class OneLineErrors(click.Group):
    """Click prints usage errors as a usage block; sdexport prints one line (``error: ...``), exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdexport")
def cli():
    """Stable Diffusion (diffusers layout) -> validated ONNX / TensorRT engines."""


@cli.command()
@click.argument("name")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@handled
def preset(name, out):
    """Write a built-in preset (tiny, sd15-random) as a diffusers model directory."""
    from .models import write_preset

    path = write_preset(name, out, progress=say)
    click.echo(str(path))


@cli.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Export directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: mixed precision, normalizations/softmax/resize/time embedding kept FP32.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--components", default="text_encoder,unet,vae_decoder,vae_encoder", show_default=True,
              help="Comma-separated subset to export.")
@click.option("--max-batch", type=int, default=4, show_default=True, help="Most images per call.")
@click.option("--min-size", type=int, default=None, help="Smallest image side in pixels (default: half native).")
@click.option("--max-size", type=int, default=None, help="Largest image side in pixels (default: twice native).")
@click.option("--force", is_flag=True, help="Re-export even if nothing changed.")
@handled
def export(model, out, dtype, opset, components, max_batch, min_size, max_size, force):
    """Export MODEL (a diffusers directory or preset name) to ONNX in Optimum's layout."""
    from .export import export as run

    run(model, out, dtype=dtype, opset=opset, components=[c.strip() for c in components.split(",") if c.strip()],
        max_images=max_batch, min_size=min_size, max_size=max_size, force=force, say=say)
    click.echo(f"{out}/manifest.json")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--components", default=None, help="Comma-separated subset (default: all exported).")
@handled
def validate(export_dir, backend, device, components):
    """Compare every component with PyTorch eager at shapes across the dynamic range."""
    from .errors import ValidationFailed
    from .validate import validate as run

    report = run(export_dir, backend=backend, device=_device(device),
                 components=components.split(",") if components else None, say=say)
    click.echo(f"{export_dir}/validation.json: {'PASSED' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        failed = sorted({r["component"] for r in report["results"] if not r["pass"]})
        raise ValidationFailed(f"{', '.join(failed)} missed the thresholds; see {export_dir}/validation.json")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default="", show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG path.")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=None, help="Pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, help="Pixels (default: the model's native size).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None,
              help="Default: the model's own scheduler.")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@handled
def infer(export_dir, prompt, negative_prompt, out, steps, guidance_scale, seed, height, width, batch_size,
          scheduler, backend, device):
    """Generate image(s) with the engines of EXPORT_DIR; writes PNG(s) and a JSON sidecar."""
    from tqdm import tqdm

    from .backends import load_engines
    from .pipeline import Pipeline, save_images
    from .runtime import ExportDir

    device = _device(device)
    export = ExportDir.open(export_dir)
    engines = load_engines(export_dir, backend, device=device)
    pipe = Pipeline(engines, export, device=device, warn=lambda m: say(f"warning: {m}"))
    bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, leave=False, disable=None)
    result = pipe(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
                  height=height, width=width, batch_size=batch_size, scheduler=scheduler,
                  progress=lambda i, n: (setattr(bar, "total", n), bar.update(1)))
    bar.close()
    summary = result.stage_summary()
    meta = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
            "scheduler": scheduler or export.info.scheduler_config["_class_name"], "guidance_scale": guidance_scale,
            "height": result.images.shape[1], "width": result.images.shape[2], "batch_size": batch_size,
            "backend": backend, "device": device, "export": str(export.root), "prompt_truncated": result.truncated,
            "timings_ms": {k: round(v, 3) for k, v in summary.items()}}
    names = save_images(result, out, meta)
    say(f"{backend} on {device}: total {summary['total_ms']:.1f} ms (text {summary['text_encoder_ms']:.1f}, "
        f"UNet x{summary['unet_steps']} {summary['unet_total_ms']:.1f}, VAE {summary['vae_decoder_ms']:.1f}, "
        f"loop overhead {summary['loop_overhead_ms']:.1f})")
    for name in names:
        click.echo(name)


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--guidance-scale", type=float, default=7.5, show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None)
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs (median reported).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs first.")
@click.option("--eager-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision of the PyTorch eager baseline.")
@click.option("--no-eager", is_flag=True, help="Skip the PyTorch eager comparison.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures here.")
@handled
def bench(export_dir, backend, device, steps, height, width, batch_size, guidance_scale, scheduler, runs, warmup,
          eager_dtype, no_eager, json_path):
    """Time the engines against PyTorch eager on the same shapes, in one run."""
    from .bench import bench as run
    from .bench import format_table
    from .errors import UsageError
    from .manifest import write_json

    if runs < 1 or warmup < 0:
        raise UsageError("--runs must be at least 1 and --warmup at least 0")
    report = run(export_dir, backend=backend, device=_device(device), steps=steps, height=height, width=width,
                 batch_size=batch_size, guidance_scale=guidance_scale, scheduler=scheduler, runs=runs,
                 warmup=warmup, eager_dtype=eager_dtype, compare_eager=not no_eager, say=say)
    click.echo(format_table(report))
    if json_path:
        write_json(json_path, report)
        click.echo(json_path)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handled
def env(as_json):
    """What this host has: torch, CUDA, GPU, ONNX Runtime, TensorRT; what can build and run here."""
    from .envinfo import describe, format_env

    report = describe()
    click.echo(json.dumps(report, indent=2) if as_json else format_env(report))


def main() -> None:
    cli.main(prog_name="sdexport")


if __name__ == "__main__":
    main()
