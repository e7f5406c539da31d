"""sdkit: fine-tune, evaluate, generate with and export Stable Diffusion models."""

__version__ = "0.1.0"
