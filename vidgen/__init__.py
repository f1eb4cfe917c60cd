"""vidgen: train and evaluate video diffusion models on a Ray cluster."""

__version__ = "0.1.0"
