"""Training steps on one GPU (issue 24, item 4), through the trainer's own loop (jobs/trainer.py:
bf16 autocast, backward, gradient clipping, AdamW, the progress line's host syncs) and the jobs'
own tasks (VQVAETask, PriorTask: their models, optimizers and losses), fed one synthetic batch over
and over instead of their data streams, without checkpoints or the final evaluation. Steps run in
two windows of WINDOW steps; the rate is the second window's (the first holds cuDNN's and
Triton's first calls). So these are the ceilings the data loading must keep up with:
  tokenizers  the 28 px conv (the default) and llamagen-vq16 at 256 px, img/s (k-means init off:
              it runs once, on the first batches)
  priors      benchmarks/gpu/priors.py's class and text priors, image tokens/s
One GPU only: NCCL across GPUs (the --workers path on Ray Train) cannot be measured here."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .common import NO_CUDA, Part, oom, rate
from .priors import PROMPTS, specs, text_tokenizer_json

TITLE = "Training steps on one GPU: tokenizers img/s, priors tokens/s"
WINDOW = {"conv": 20, "vqgan": 5, "prior": 10}


def run(part: Part) -> None:
    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    tok = part.table("Tokenizer training (trainer loop, bf16 autocast, batch on the device)",
                     ["model", "batch", "img/s", "ms per step"])
    for name, cfg, batches in tokenizers(part.smoke):
        for b in batches:
            if part.has_time(15 if cfg.arch == "conv" else 30, f"{name} batch {b}"):
                measure(part, tok, name, b, tokenizer_task(part, cfg, b), "img")
    pri = part.table("Prior training (trainer loop, bf16 autocast)",
                     ["prior", "batch", "image tokens/s", "grids/s", "ms per step"])
    for spec in specs(part.smoke):
        for b in (64, 256) if spec.grid < 16 and not part.smoke else (32,) if not part.smoke else (4,):
            if part.has_time(15, f"{spec.name} batch {b}"):
                measure(part, pri, spec.name, b, prior_task(part, spec, b), "tok", per=spec.grid**2)
    part.note("one GPU: NCCL across GPUs (Ray Train --workers N) is not measured; synthetic batches already on the "
              "device (tokenizers) or in host memory as the token stream gives them (priors)")


def measure(part: Part, table, name: str, batch: int, task: tuple, unit: str, per: int = 1) -> None:
    """A row of `table`: `task` (task class, config, payload, batch) trained for its steps."""
    try:
        per_s = train(part, *task, unit)
    except Exception as e:
        if not oom(e):
            raise
        table.note(f"{name} batch {batch}: out of memory")
        torch.cuda.empty_cache()
        return
    step_ms = 1e3 * batch * per / per_s
    cells = [rate(per_s), rate(per_s / per)] if unit == "tok" else [rate(per_s)]
    table.add(name, batch, *cells, f"{step_ms:.1f}")


def train(part: Part, task_cls, cfg, payload, batch, unit: str) -> float:
    """Items per second over the second window of cfg.steps, from the trainer's own progress."""
    from vqtok.jobs.trainer import Trainer, WorkerContext
    from vqtok.models import Collectives

    class NoCheckpoints(WorkerContext):
        def save_state(self, run_dir, step, state, keep, metrics):
            pass

    class Measured(task_cls):
        def batches(self, per_rank_batch, skip):
            while True:
                yield batch

        def evaluate(self, model, step, *, final=False):
            pass

        def finish(self, model, run_dir, summary):
            return {"train": summary.train, "seconds": summary.seconds}

    run_dir = Path(tempfile.mkdtemp(dir=part.work))
    ctx = NoCheckpoints(Collectives(device=part.device), part.device)
    Trainer(Measured(cfg, payload, ctx), run_dir).train()
    return json.loads((run_dir / "metrics.json").read_text())["train"][f"{unit}_per_s"]


def loop_options(part: Part, kind: str, batch: int) -> dict:
    w = 1 if part.smoke else WINDOW[kind]
    return dict(out="unused (no checkpoints)", steps=2 * w, log_every=w, checkpoint_every=2 * w, warmup_steps=w,
                batch_size=batch, device=part.device)


def tokenizers(smoke: bool):
    from vqtok import VQVAEConfig

    if smoke:
        return [("conv 28px (tiny)", VQVAEConfig(width=16, code_dim=8, codebook_size=16, res_blocks=1, kmeans_init=False),
                 (4,)),
                ("vqgan 16px (llamagen-vq16 shape, tiny)", VQVAEConfig.from_preset(
                    "llamagen-vq16", image_size=16, width=32, codebook_size=32, res_blocks=1, kmeans_init=False), (2,))]
    return [("conv 28px (default)", VQVAEConfig(kmeans_init=False), (128, 512)),
            ("llamagen-vq16 256px", VQVAEConfig.from_preset("llamagen-vq16", kmeans_init=False), (8, 32))]


def tokenizer_task(part: Part, model, batch: int):
    from vqtok.jobs.train_vqvae import TrainConfig, VQVAEPayload, VQVAETask
    from vqtok.pipeline.sharded_stream import Batch

    cfg = TrainConfig(data=["synthetic"], model=model.to_dict(), **loop_options(part, model.arch, batch))
    s = model.image_size
    pixels = torch.randint(0, 256, (batch, s, s, model.channels), dtype=torch.uint8, device=part.device)
    data = Batch(pixels=pixels, labels=[None] * batch, keys=[str(i) for i in range(batch)], consumed=batch)
    return VQVAETask, cfg, VQVAEPayload(units=[], val_units=None), data


def prior_task(part: Part, spec, batch: int):
    from vqtok.jobs.train_prior import DataSummary, PriorPayload, PriorTask, PriorTrainConfig
    from vqtok.pipeline.sharded_stream import TokenBatch

    prior = spec.config()
    shape = {k: getattr(prior, k) for k in ("n_layer", "n_head", "n_embd")}
    cfg = PriorTrainConfig(tokens=["synthetic"], model=shape, text_tokenizer="bytes" if spec.text else "",
                           max_text_tokens=spec.max_text_tokens, **loop_options(part, "prior", batch))
    data = DataSummary(unigram_entropy_bits=0.0, codes_used=spec.codebook_size, rows=batch, counted_rows=batch,
                       labeled_rows=batch, datasets=[], val_datasets=[])
    payload = PriorPayload(prior, parts=[], val_parts=None, data=data, tokenizer_path="",
                           text_tokenizer=text_tokenizer_json(spec.text_kind) if spec.text else None)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.codebook_size, (batch, spec.grid, spec.grid), generator=g)
    labels = torch.randint(0, spec.classes, (batch,), generator=g)
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(batch)] if spec.text else None
    return PriorTask, cfg, payload, TokenBatch(tokens=tokens, labels=labels, consumed=batch, epoch=0, captions=captions)
