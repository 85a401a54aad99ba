"""Run under the Optimum environment: load an sdexport export with Optimum's ORT pipeline, generate, save.

usage: python generate.py EXPORT_DIR OUT.npy PROMPT SEED STEPS HEIGHT WIDTH SCHEDULER_CLASS [PIPELINE [GUIDANCE]]
PIPELINE: ORTStableDiffusionPipeline (default) or ORTStableDiffusionXLPipeline.
"""

import sys

import numpy as np
import optimum.onnxruntime
import torch

export_dir, out, prompt, seed, steps, height, width, scheduler = sys.argv[1:9]
pipeline = sys.argv[9] if len(sys.argv) > 9 else "ORTStableDiffusionPipeline"
guidance = float(sys.argv[10]) if len(sys.argv) > 10 else 7.5
extra = {"add_watermarker": False} if "XL" in pipeline else {}
pipe = getattr(optimum.onnxruntime, pipeline).from_pretrained(export_dir, **extra)
import diffusers  # noqa: E402

pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
images = pipe(prompt, num_inference_steps=int(steps), height=int(height), width=int(width), guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="np").images
np.save(out, images.astype(np.float32))
print("optimum", type(pipe).__name__, images.shape)
