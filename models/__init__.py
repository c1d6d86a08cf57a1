"""Torch modules: the VQ-VAE (encoder, quantizer, decoder), the tokenizer bundle, the prior."""
from .preprocess import Preprocess
from .prior import Prior, PriorConfig, Samples
from .quantizer import VectorQuantizer, kmeans, perplexity, psnr, straight_through
from .tokenizer import Tokenizer, bundle_id
from .vqvae import VQVAE, Decoder, Encoder, VQVAEConfig

__all__ = ["Preprocess", "VectorQuantizer", "kmeans", "perplexity", "psnr", "straight_through",
           "VQVAE", "Decoder", "Encoder", "VQVAEConfig", "Tokenizer", "bundle_id", "Prior", "PriorConfig", "Samples"]
