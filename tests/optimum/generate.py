"""Run under the Optimum environment: load an sdexport export with ORTStableDiffusionPipeline, generate, save.

usage: python generate.py EXPORT_DIR OUT.npy PROMPT SEED STEPS HEIGHT WIDTH SCHEDULER_CLASS
"""

import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTStableDiffusionPipeline

export_dir, out, prompt, seed, steps, height, width, scheduler = sys.argv[1:9]
pipe = ORTStableDiffusionPipeline.from_pretrained(export_dir)
import diffusers  # noqa: E402

pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
images = pipe(prompt, num_inference_steps=int(steps), height=int(height), width=int(width), guidance_scale=7.5,
              generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="np").images
np.save(out, images.astype(np.float32))
print("optimum", type(pipe).__name__, images.shape)
