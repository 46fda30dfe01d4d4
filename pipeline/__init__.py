"""BD3-LM continued pretraining pipeline: AR LLaMA-family checkpoints to block diffusion LMs."""

__version__ = "0.1.0"
