"""Block diffusion science as plain PyTorch: noise, the NELBO objective, the sampler, likelihood metrics.

The attention masks live with the attention code, in ``pipeline.model.masks``.
"""
