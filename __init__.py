"""vqtok: turn image corpora into token datasets, and train models on the tokens.

    import vqtok
    result = vqtok.train_vqvae(vqtok.TrainConfig(data=["examples/fashion-mnist"], out="runs/tok"))
    tok = vqtok.Tokenizer.load(result.tokenizer_dir)
    tokens = tok.encode(images)          # (B, h, w) int64
    images = tok.decode(tokens)          # uint8
    vqtok.tokenize(result.tokenizer_dir, "shards/*.tar", "out/tokens")   # Parquet token dataset (Ray Data)
    tokens, labels = vqtok.TokenDataset("out/tokens").to_numpy()
    vqtok.train_prior(tokens=["out/tokens"], out="runs/prior", steps=2000)   # GPT over the token grids
    samples = vqtok.Prior.load("runs/prior").sample(64, classes=3)          # .tokens, .images
"""
import importlib
from typing import TYPE_CHECKING

# Names resolve on first use (PEP 562), so `python -m vqtok.jobs.NAME` runs its module once and
# `import vqtok` stays cheap.
_EXPORTS = {
    "eval_vqvae": "jobs.eval_vqvae", "EvalConfig": "jobs.eval_vqvae",
    "tokenize": "jobs.tokenize", "TokenizeConfig": "jobs.tokenize", "TokenizeResult": "jobs.tokenize",
    "TrainConfig": "jobs.train_vqvae", "TrainResult": "jobs.train_vqvae", "train_vqvae": "jobs.train_vqvae",
    "train_prior": "jobs.train_prior", "PriorTrainConfig": "jobs.train_prior", "PriorResult": "jobs.train_prior",
    "sample": "jobs.sample", "SampleConfig": "jobs.sample", "caption": "jobs.caption", "CaptionConfig": "jobs.caption",
    "import_tokenizer": "jobs.import_tokenizer", "ImportConfig": "jobs.import_tokenizer",
    "Pipeline": "jobs.run", "PipelineConfig": "jobs.run", "demo": "jobs.demo",
    "nearest_code": "kernels",
    "Preprocess": "models", "Tokenizer": "models", "VQVAEConfig": "models", "Prior": "models", "PriorConfig": "models",
    "convert": "pipeline.convert",
    "ConfigError": "models.config", "DataError": "pipeline.errors",
    "list_units": "pipeline.sources",
    "TokenDataset": "pipeline.token_dataset",
    "train_text_tokenizer": "jobs.train_text_tokenizer", "TextTokenizerConfig": "jobs.train_text_tokenizer",
    "decode_sequence": "jobs.decode_sequence",
    "TextTokenizer": "models.text_tokenizer", "Vocabulary": "models.vocabulary",
    "export_lm": "jobs.export_lm", "ExportLMConfig": "jobs.export_lm", "ExportResult": "jobs.export_lm",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .jobs.eval_vqvae import EvalConfig, eval_vqvae
    from .jobs.tokenize import TokenizeConfig, TokenizeResult, tokenize
    from .jobs.demo import demo
    from .jobs.sample import SampleConfig, sample
    from .jobs.caption import CaptionConfig, caption
    from .jobs.import_tokenizer import ImportConfig, import_tokenizer
    from .jobs.run import Pipeline, PipelineConfig
    from .jobs.train_prior import PriorResult, PriorTrainConfig, train_prior
    from .jobs.train_vqvae import TrainConfig, TrainResult, train_vqvae
    from .kernels import nearest_code
    from .models import Preprocess, Prior, PriorConfig, Tokenizer, VQVAEConfig
    from .pipeline.convert import convert
    from .models.config import ConfigError
    from .pipeline.errors import DataError
    from .pipeline.sources import list_units
    from .pipeline.token_dataset import TokenDataset
    from .jobs.train_text_tokenizer import TextTokenizerConfig, train_text_tokenizer
    from .jobs.decode_sequence import decode_sequence
    from .models.text_tokenizer import TextTokenizer
    from .models.vocabulary import Vocabulary
    from .jobs.export_lm import ExportLMConfig, ExportResult, export_lm

try:
    from importlib.metadata import version as _version

    __version__ = _version("vqtok")
except Exception:  # pragma: no cover
    __version__ = "0+unknown"

__all__ = [
    "TrainConfig", "TrainResult", "train_vqvae", "eval_vqvae", "EvalConfig", "Tokenizer", "VQVAEConfig", "Preprocess",
    "tokenize", "TokenizeConfig", "TokenizeResult", "TokenDataset",
    "train_prior", "PriorTrainConfig", "PriorResult", "Prior", "PriorConfig", "sample", "SampleConfig", "caption", "CaptionConfig",
    "Pipeline", "PipelineConfig", "demo",
    "nearest_code", "convert", "list_units", "ConfigError", "DataError", "__version__",
    "train_text_tokenizer", "TextTokenizerConfig", "decode_sequence", "TextTokenizer", "Vocabulary",
    "export_lm", "ExportLMConfig", "ExportResult",
]
