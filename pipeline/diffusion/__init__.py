"""Block diffusion science as plain PyTorch: masks, noise, the NELBO objective, the sampler."""
