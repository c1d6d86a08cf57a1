"""vqtok: turn image corpora into token datasets, and train models on the tokens.

    import vqtok
    result = vqtok.train_vqvae(vqtok.TrainConfig(data=["examples/fashion-mnist"], out="runs/tok"))
    tok = vqtok.Tokenizer.load(result.tokenizer_dir)
    tokens = tok.encode(images)          # (B, h, w) int64
    images = tok.decode(tokens)          # uint8
    vqtok.tokenize(result.tokenizer_dir, "shards/*.tar", "out/tokens")   # Parquet token dataset (Ray Data)
    tokens, labels = vqtok.TokenDataset("out/tokens").to_numpy()
"""
from .jobs.eval_vqvae import eval_vqvae
from .jobs.tokenize import TokenizeConfig, TokenizeResult, tokenize
from .jobs.train_vqvae import TrainConfig, TrainResult, train_vqvae
from .kernels import nearest_code
from .models import Preprocess, Tokenizer, VQVAEConfig
from .pipeline.convert import convert
from .pipeline.errors import ConfigError, DataError
from .pipeline.sources import list_units
from .pipeline.tokens import TokenDataset

try:
    from importlib.metadata import version as _version

    __version__ = _version("vqtok")
except Exception:  # pragma: no cover
    __version__ = "0+unknown"

__all__ = [
    "TrainConfig", "TrainResult", "train_vqvae", "eval_vqvae", "Tokenizer", "VQVAEConfig", "Preprocess",
    "tokenize", "TokenizeConfig", "TokenizeResult", "TokenDataset",
    "nearest_code", "convert", "list_units", "ConfigError", "DataError", "__version__",
]
