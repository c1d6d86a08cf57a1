"""Torch modules: the VQ-VAE (encoder, quantizer, decoder), the tokenizer bundle, the prior.
Imports kernels/ only (and torch, safetensors, PIL)."""
from .bundle import bundle_id, vqtok_version
from .config import Config, ConfigError, option
from .distributed import Collectives
from .prior import Prior, PriorConfig, Samples
from .tokenizer import Preprocess, Tokenizer
from .vqvae import VQVAE, Decoder, Encoder, VectorQuantizer, VQVAEConfig, kmeans, perplexity, straight_through

__all__ = ["Preprocess", "VectorQuantizer", "kmeans", "perplexity", "straight_through", "Collectives",
           "Config", "ConfigError", "option", "VQVAE", "Decoder", "Encoder", "VQVAEConfig", "Tokenizer", "bundle_id",
           "vqtok_version", "Prior", "PriorConfig", "Samples"]
