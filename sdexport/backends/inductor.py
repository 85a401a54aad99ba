"""AOTInductor engine: a package compiled by ``sdexport build --backend inductor`` (sdexport/inductor.py).

One static shape per package (the shape it was compiled for); inputs and outputs are FP32 torch tensors on
the package's device, like every other engine. The package runs on torch's current stream, loaded
``run_single_threaded`` so that the pipeline's step graphs can capture it. Components without a package
run on ONNX Runtime (the text encoders run once per image; the UNet is where the time goes).
"""

from __future__ import annotations

from typing import Any

from ..errors import ShapeError
from .base import Engine, current_request


def _import_onnxruntime_first() -> None:
    """On an H100 (torch 2.11+cu130, driver 580) a fresh interpreter died with SIGSEGV inside aoti_load_package
    unless onnxruntime had been imported first; torch.cuda.init() or a CUDA tensor beforehand did not help
    (benchmarks/aoti_load_probe.py). infer and bench always had imported it, through the ONNX Runtime engines
    of the other components; 'validate --backend inductor' had not. Import it where installed."""
    try:
        import onnxruntime  # noqa: F401  (see the docstring)
    except ImportError:
        pass


class InductorEngine(Engine):
    backend = "inductor"

    def __init__(self, export, component: str, device: str):
        import torch

        from ..inductor import check_package

        super().__init__(export.specs[component], device)
        self.path, self.entry = check_package(export, component, device)
        index = torch.device(device).index if device.startswith("cuda") else -1
        if device.startswith("cuda"):
            _import_onnxruntime_first()
        self.model = torch._inductor.aoti_load_package(str(self.path), run_single_threaded=True,
                                                       device_index=index if index is not None else 0)
        self.static_dims = dict(self.entry["dims"])
        self.batch_range = self.entry.get("batch_range")  # [lo, hi] rows for a dynamic batch axis
        self.root, self.scale = export.root, export.info.vae_scale_factor  # latent side * scale = pixels
        self.onnx = component in export.manifest.components  # --backend ort can run it at other sizes

    def fits(self, dims: dict[str, int]) -> bool:
        if self.batch_range:
            lo, hi = self.batch_range
            rest = {k: v for k, v in dims.items() if k != "batch"}
            return lo <= dims["batch"] <= hi and rest == {k: v for k, v in self.static_dims.items() if k != "batch"}
        return dims == self.static_dims

    def pixels(self, dims: dict[str, int]) -> tuple[int, int] | None:
        """The image size (height, width) in pixels of a call's axes (None: a text encoder's have none)."""
        if "latent_height" in dims:
            return dims["latent_height"] * self.scale, dims["latent_width"] * self.scale
        if "image_height" in dims:
            return dims["image_height"], dims["image_width"]
        return None

    def mismatch(self, dims: dict[str, int]) -> ShapeError:
        """A call the package was not compiled for, in the user's terms: image size in pixels, images per call."""
        geo = self.entry["geometry"]
        built = f"{geo['height']}x{geo['width']}"
        pixels = self.pixels(dims)
        asked = f"{pixels[0]}x{pixels[1]}" if pixels else None  # a text encoder's call has no image size
        lo, hi = self.batch_range or (self.static_dims["batch"],) * 2
        per_image = hi // geo["images"]  # rows per image: two through the text encoder and UNet under guidance
        req = current_request()  # the request's images per call (None: the engine was called on its own)
        size = f"{req.height}x{req.width}" if req is not None else "HxW"  # a text encoder's call has none of its own
        was, request, hint = [], [], ""
        if asked not in (None, built):
            was.append(f"was built for {built} images (height x width, pixels)")
            request.append(asked)
        if not lo <= dims["batch"] <= hi:
            images = f"1 to {geo['images']} images" if self.batch_range else _count(geo["images"], "image")
            rows = f"{lo} to {hi} rows" if self.batch_range else _count(hi, "row")
            guided = f" with classifier-free guidance ({rows})" if per_image > 1 else ""
            was.append(f"takes {images} per call{guided}")
            unguided = req is not None and not req.guidance and per_image > 1  # a guided package, a request without
            request.append(self._request_images(dims["batch"], per_image, req, unguided))
            if unguided:
                hint = "; packages are compiled with classifier-free guidance, which a guidance scale above 1 turns on"
        other = "; or run it with --backend ort, whose ONNX graphs take every size of the export" if self.onnx else ""
        return ShapeError(f"{self.spec.name}: the Inductor package {self.entry['file']} {' and '.join(was)}; this "
                          f"request is {', '.join(request)}: build packages for it with 'sdexport build {self.root} "
                          f"--backend inductor --static {asked or size} [--batch N | --max-batch N]'{hint}{other}")

    @staticmethod
    def _request_images(rows: int, per_image: int, req, unguided: bool) -> str:
        """A call of ``rows`` rows in the package's terms, images per call (its rows where they are not the
        images): "3 images per call (6 rows)". The images are the request's; without one (an engine called on
        its own) the rows are read at the package's rows per image. ``unguided``: the request has no guidance and
        the package was compiled with it (mismatch decides it once, for this and for its hint)."""
        images = req.images if req is not None else (rows // per_image if rows % per_image == 0 else None)
        if images is None:
            return f"{_count(rows, 'row')} per call"
        without = " without classifier-free guidance" if unguided else ""
        shown = f" ({_count(rows, 'row')})" if per_image > 1 or rows != images else ""
        return f"{_count(images, 'image')} per call{without}{shown}"

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        dims = self.dims(feed)
        rows = None
        if not self.fits(dims):  # fewer rows than the package takes (SDXL's text encoders): padded, then sliced
            least = {**self.static_dims, **({"batch": self.batch_range[0]} if self.batch_range else {})}
            padded, padded_dims, rows = self.fit_static_batch(feed, dims, least)
            if rows is None or not self.fits(padded_dims):
                raise self.mismatch(dims)
            feed = padded
        args = [feed[t.name].to(device=self.device, dtype=getattr(torch, t.dtype)).contiguous()
                for t in self.spec.inputs]
        with torch.inference_mode():
            outs = self.model(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return self.keep_rows(dict(zip(self.spec.output_names, outs)), rows)

    def close(self) -> None:
        self.model = None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def load_all(export, components: list[str], device: str, **options) -> dict[str, Engine]:
    """Inductor engines where the export has a package, ONNX Runtime for the rest (said in ``backend``)."""
    from .ort import OrtEngine

    packages = export.manifest.data.get("inductor", {})
    export.check_components([c for c in components if c not in packages])
    engines: dict[str, Engine] = {}
    for c in components:
        if c in packages:
            engines[c] = InductorEngine(export, c, device)
        else:
            engine = OrtEngine(export, c, device=device, threads=options.get("threads"),
                               batch_varies=options.get("batch_varies", False))
            engine.backend = "ort (no inductor package)"
            engines[c] = engine
    if options.get("cuda_graph") and "unet" in engines:
        from .base import CudaGraphed

        engines["unet"] = CudaGraphed(engines["unet"])
    if not any(isinstance(getattr(e, "inner", e), InductorEngine) for e in engines.values()):
        raise no_packages(export)
    return engines


def no_packages(export) -> Exception:
    from ..errors import IntegrityError

    return IntegrityError(f"{export.root}: no Inductor engines; run 'sdexport build {export.root} --backend "
                          "inductor --static HxW'")


def check_has_packages(export) -> None:
    """IntegrityError (exit 5) where the export has no Inductor package at all."""
    if not export.manifest.data.get("inductor"):
        raise no_packages(export)
