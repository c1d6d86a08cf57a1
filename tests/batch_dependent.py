"""A tokenizer whose tokens depend on the whole batch they were encoded in (unlike the real conv
model, whose tokens are the same in any batch): installed in the test process and, through Ray's
worker_process_setup_hook, in every Ray worker, so a pipeline that encoded images in any other
grouping than by position in their unit would write other tokens."""
import torch


def install() -> None:
    from vqtok.models.tokenizer import Tokenizer

    if getattr(Tokenizer._encode_pixels, "batch_dependent", False):
        return
    real = Tokenizer._encode_pixels

    def encode(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            chunk = pixels[i : i + batch_size]
            shift = chunk.shape[0] + int(chunk[:, :4].sum())  # what else is in the batch moves every token
            out.append((real(self, chunk, batch_size) + shift) % self.config.codebook_size)
        return torch.cat(out) if out else real(self, pixels, batch_size)

    encode.batch_dependent = True
    encode.real = real
    Tokenizer._encode_pixels = encode
