"""Serving on ONNX Runtime CUDA without Triton: the ImageService that serve's Triton model wraps (so a GPU host
without the serve extra runs it too). Runs where CUDA and onnxruntime-gpu are (`make gputest`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import request_tensors as tensors


def _cuda_ort() -> bool:
    import onnxruntime
    import torch

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ort(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_vae_slicing_on_cuda_keeps_each_image_its_own(export_fp32):
    """On ONNX Runtime CUDA the VAE reports the switch cost, serve slices, and each sliced image is its own: the
    engine hands back the same bound buffer for every one-image call, so an output not copied out would make
    every image the last one. The sliced images match the batched decode (PSNR >= 40 dB; kernels may differ)."""
    from sdexport.serve import ImageService

    service = ImageService(export_fp32, device="cuda")
    try:
        assert service.pipe.engines["vae_decoder"].fixed_batch_preferred and service.pipe.vae_slicing
        for name in ("unet", "vae_decoder"):  # the option reached the CUDA execution provider
            options = service.pipe.engines[name].session.get_provider_options()["CUDAExecutionProvider"]
            assert options["cudnn_conv_algo_search"] == "HEURISTIC", (name, options)
        request = tensors(prompt=["a boat", "a cat", "a dog"], seed=[1, 2, 3], steps=[2] * 3, height=[64] * 3,
                          width=[96] * 3, scheduler=["euler"] * 3)
        sliced = service.run([service.parse(request)])[0].images
        service.pipe.vae_slicing = False
        batched = service.run([service.parse(request)])[0].images
        assert not np.array_equal(sliced[0], sliced[1]) and not np.array_equal(sliced[1], sliced[2])
        for a, b in zip(sliced, batched):
            mse = np.mean((a.astype(np.float64) - b) ** 2)
            assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 40.0
    finally:
        service.close()
