"""Diffusion sampling (book chapter 18), kept apart from the models as diffusers keeps its schedulers apart.

- `torchbook.diffusion.schedulers`: the variance schedule (equation 18-7) and the DDPM and DDIM update rules, in two
  modes: `book` (the book's formulas) and `diffusers` (the same arithmetic as diffusers' `DDPMScheduler` and
  `DDIMScheduler`, equal step for step).
- `torchbook.diffusion.sampling`: the sampling loop over any noise-predicting model, with classifier-free guidance.
- `torchbook.diffusion.pretrained`: Hugging Face `UNet2DModel` folders and their scheduler config, loaded into our
  U-Net (`torchbook.models.unet`) and sampler.

This package sits beside `torchbook.generate` (the token loop): it drives a model, it is not one.
"""
