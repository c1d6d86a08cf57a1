"""Batch-tokenize a corpus to a Parquet token dataset: `vqtok tokenize` / `python -m vqtok.jobs.tokenize`
(the Ray Jobs entry point) / `vqtok.tokenize(...)`; one code path.

    result = vqtok.tokenize("runs/demo/tokenizer-run/tokenizer", ["shards/*.tar"], "out/tokens")
    ds = vqtok.TokenDataset("out/tokens")

Plan on the driver (units listed and sorted, fingerprint checked, committed units skipped), then a
Ray Data stream: read + decode in Ray tasks (one per unit), encode in an actor pool that loads the
tokenizer once per actor (on GPU when asked), token rows back to the driver, which commits each
unit when its last row arrives (pipeline/stages.py: the stages and the rows in flight; pipeline/token_writer.py:
TokenWriter, the commit). Kill it at any point and run the same command
again: it resumes and the dataset ends up exactly as a clean run writes it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..models.bundle import read_bundle, vqtok_version
from ..models.config import Config, ConfigError, option
from ..models.tokenizer import DEFAULT_MAX_PIXELS, Tokenizer
from ..pipeline.captions import MAX_CAPTION_BYTES, TextFields
from ..pipeline.errors import DataError
from ..pipeline.lease import DEFAULT_TTL
from ..pipeline.sources import FOLDER_UNIT_SIZE, Failure, list_units, split_patterns
from ..pipeline.token_format import ERRORS_DIR, dataset_metadata, describe_captions
from ..pipeline.token_writer import CHANGED, REMOVED, OutputRefused, Plan, TokenWriter, list_some
from ..pipeline.stages import BatchEncoder, UnitCollector, commit_unit, read_units, unit_items
from ._ray import check_address, check_resources, init_ray
from .options import Command, job_main
from .progress import fmt_duration


@dataclass(kw_only=True)
class TokenizeConfig(Config):
    WHAT = "tokenize config"
    tokenizer: str = option("", "tokenizer bundle directory or URL (RUN_DIR/tokenizer from train-vqvae)")
    data: list[str] = option(help="input images: paths or URL patterns (repeat or comma-separate)", factory=list)
    out: str = option("", "token dataset directory or URL (s3://bucket/prefix)")
    batch_size: int = option(256, "images per encoder batch")
    workers: int = option(1, "encoder actors")
    gpus_per_worker: float = option(0.0, "GPUs per encoder actor (0: CPU)")
    cpus_per_worker: float | None = option(None, "Ray CPUs each encoder reserves (default 1 with a GPU, 0.5 without)")
    threads_per_worker: int = option(0, "torch threads per CPU encoder (0: the encoder's node's CPUs / workers)")
    address: str | None = option(None, "Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS if set, "
                                       "else an embedded local Ray)")
    max_failure_fraction: float = option(0.1, "fail when more of the input images than this are bad")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse larger images as decompression bombs")
    caption_column: str | None = option(None, "Parquet inputs: the column holding captions (default: the first of "
                                              "caption, text, txt, in any case)")
    keep_columns: list[str] = option(help="source metadata to keep in the `meta` column (a JSON object): Parquet "
                                          "columns or fields of KEY.json / NAME.json; '*' keeps all (repeat or "
                                          "comma-separate)", factory=list)
    max_caption_bytes: int = option(MAX_CAPTION_BYTES, "captions longer than this (UTF-8 bytes) are cut there "
                                                       "(counted, recorded in _errors/)")
    folder_unit_size: int = option(FOLDER_UNIT_SIZE, "image folders: files per unit on average (units are cut where "
                                                     "a file's path hashes to 0 mod this, so adding files moves none)")
    changed_inputs: str = option("redo", "committed inputs that changed since (size, mtime/ETag, a folder unit's "
                                         "files): redo (re-tokenize, replacing their parts) or refuse")
    removed_inputs: str = option("refuse", "committed inputs no longer given: refuse (stop, naming them), keep (their "
                                           "rows stay) or drop (their rows go, as in a clean run over the inputs)")
    lease_seconds: float = option(DEFAULT_TTL, "object stores: a writer's lease on --out expires this long after its "
                                               "last heartbeat (local disk: when its process ends)")
    progress_seconds: float = option(10.0, "seconds between progress lines")
    verbose: bool = option(True, "print progress and the summary", cli=False)

    def __post_init__(self):
        self.data = split_patterns(self.data) if self.data else []
        if not self.tokenizer:
            raise ConfigError("--tokenizer is required: a bundle directory written by `vqtok train-vqvae` (RUN_DIR/tokenizer)")
        if not self.data:
            raise ConfigError("--data is required: input paths or URL patterns (e.g. shards/train-{000..009}.tar)")
        if not self.out:
            raise ConfigError("--out is required: where the token dataset goes (a directory or s3://bucket/prefix)")
        for name, low in (("batch_size", 1), ("workers", 1), ("folder_unit_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {low}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker}: must be 0 (CPU) or more")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker {self.cpus_per_worker}: must be positive")
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"--max-failure-fraction {self.max_failure_fraction}: must be in [0, 1]")
        if self.changed_inputs not in CHANGED:
            raise ConfigError(f"--changed-inputs {self.changed_inputs!r}: expected one of {', '.join(CHANGED)}")
        if self.removed_inputs not in REMOVED:
            raise ConfigError(f"--removed-inputs {self.removed_inputs!r}: expected one of {', '.join(REMOVED)}")
        if self.lease_seconds < 2:
            raise ConfigError(f"--lease-seconds {self.lease_seconds}: must be at least 2 (heartbeats come every quarter)")
        if self.max_image_pixels < 1:
            raise ConfigError(f"--max-image-pixels {self.max_image_pixels}: must be positive")
        self.keep_columns = [c.strip() for item in self.keep_columns for c in str(item).split(",") if c.strip()]
        if self.max_caption_bytes < 1:
            raise ConfigError(f"--max-caption-bytes {self.max_caption_bytes}: must be positive")

    @property
    def text(self) -> TextFields:
        return TextFields(self.caption_column or None, tuple(self.keep_columns), self.max_caption_bytes)


@dataclass
class TokenizeResult:
    out: str
    rows: int  # in the dataset now (all committed parts)
    parts: int
    bytes: int
    failures: int  # inputs skipped, over the whole dataset
    units_total: int
    units_run: int  # tokenized by this run
    units_skipped: int  # already committed before this run
    captions: dict  # rows by caption over the whole dataset (TokenDataset.caption_counts)
    plan: Plan  # inputs new, changed, removed (kept or dropped) since the dataset's last run
    images_run: int  # rows written by this run
    seconds: float
    images_per_s: float  # images_run / seconds: the whole command, Ray start-up included
    stream_seconds: float = 0.0  # from the Ray pipeline's start to the last commit
    failure_examples: list[Failure] = field(default_factory=list)


def tokenize(tokenizer: str, data: str | list[str], out: str, **options) -> TokenizeResult:
    """Tokenize every image matched by `data` with the bundle at `tokenizer` into the token dataset
    `out`. Options: the fields of TokenizeConfig."""
    return run(TokenizeConfig(tokenizer=str(tokenizer), data=split_patterns(data), out=str(out), **options))


def run(cfg: TokenizeConfig) -> TokenizeResult:
    check_address(cfg.address)
    t0 = time.time()
    say = print if cfg.verbose else (lambda *a, **k: None)
    try:
        bundle = read_bundle(cfg.tokenizer)
        tok = Tokenizer.from_bytes(*bundle, where=cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: {e}") from None
    meta = dataset_metadata(codebook_size=tok.config.codebook_size, tokenizer_id=tok.id, grid=tok.grid,
                            preprocess=tok.preprocess.to_dict(), vqtok_version=vqtok_version(), text=cfg.text.to_dict())
    units = list_units(cfg.data, folder_unit_size=cfg.folder_unit_size)
    location = cfg.tokenizer if "://" in cfg.tokenizer else os.path.abspath(cfg.tokenizer)
    try:
        output = TokenWriter.open(cfg.out, meta, units, tokenizer_location=location, changed=cfg.changed_inputs,
                                  removed=cfg.removed_inputs, lease_seconds=cfg.lease_seconds)
    except OutputRefused as e:
        raise ConfigError(f"{e.found}: {_FIX_BY_FLAG[e.kind]}" if e.kind in _FIX_BY_FLAG else f"--out {e}") from None
    with output:
        output.write_config(cfg.to_dict())
        pending = output.pending(units)
        skipped = len(units) - len(pending)
        say(f"vqtok tokenize: {len(units)} input units from {', '.join(cfg.data)}; {skipped} already committed in "
            f"{cfg.out}, {len(pending)} to do (tokenizer {tok.id[:12]}, grid {tok.grid[0]}x{tok.grid[1]}, "
            f"K={meta['codebook_size']})" + _plan_note(output.plan), flush=True)
        images_run, examples, stream_seconds = 0, [], 0.0
        if pending:
            images_run, examples, stream_seconds = _stream(cfg, bundle, tok, meta, output, pending, say)
        seconds = time.time() - t0
        c = output.committed.values()
        result = TokenizeResult(
            out=cfg.out, rows=output.rows, parts=len(c), bytes=sum(x["bytes"] for x in c),
            failures=output.failures, units_total=len(units), units_run=len(pending), units_skipped=skipped,
            captions=output.caption_counts(),
            plan=output.plan, images_run=images_run, seconds=seconds, images_per_s=images_run / max(seconds, 1e-9),
            stream_seconds=stream_seconds, failure_examples=examples,
        )
        _check_failures(output, cfg, final=True)
    say(_summary(result), flush=True)
    return result


# what to do when TokenWriter.open refuses, in this command's flags
_FIX_BY_FLAG = {
    "unwritable": "choose a writable --out (directory or bucket prefix)",
    "other_tokenizer": "write to a new --out, or delete it to start over",
    "other_text": "give the same --caption-column, --keep-columns and --max-caption-bytes as before, or write to a "
                  "new --out",
    "foreign_files": "give an empty or new --out directory for the token dataset",
    "changed": "re-run with --changed-inputs redo to re-tokenize them (each part is replaced atomically), or restore "
               "the inputs",
    "removed": "re-run with --removed-inputs keep to keep their rows, or --removed-inputs drop to drop them (a clean "
               "run over the inputs you gave would not have them)",
}


def _stream(cfg, bundle, tok, meta, output: TokenWriter, pending, say) -> tuple[int, list[Failure], float]:
    ray = init_ray(cfg.address)
    on_gpu = cfg.gpus_per_worker > 0
    threads = 0 if on_gpu else cfg.threads_per_worker  # 0: each encoder sizes it on its own node
    cpus = cfg.cpus_per_worker or (1.0 if on_gpu else 0.5)
    check_resources(ray, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker, cpus_per_worker=cpus, decode_cpus=1)
    # Each batch is encoded in one call, so it must reach an encoder whole: Ray Data cuts a task's
    # output into blocks of at most target_max_block_size (128 MiB by default; 256 images of 256 px
    # RGB are 48 MiB, 1,024 of them 192 MiB), so that bound is raised to hold two batches.
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = max(context.target_max_block_size or 0,
                                        2 * cfg.batch_size * int(np.prod(tok.preprocess.shape)) + (1 << 20))
    ds = ray.data.from_items(unit_items(pending), override_num_blocks=len(pending))
    # decoding reserves a whole CPU, the encoders less: the different resource shapes also keep Ray
    # Data from fusing the two stages into one actor, so decoding overlaps encoding
    ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=1,
                        fn_kwargs=dict(preprocess=tok.preprocess, batch_size=cfg.batch_size,
                                       max_pixels=cfg.max_image_pixels, text=cfg.text))
    ds = ds.map_batches(BatchEncoder, batch_size=None, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                        num_cpus=cpus, num_gpus=cfg.gpus_per_worker or None,
                        fn_constructor_kwargs=dict(bundle=_StoredBundle(ray.put(bundle)),
                                                   device="cuda" if on_gpu else "cpu", threads=threads,
                                                   workers=cfg.workers))
    unit_of = {i: u for u, i in pending}  # part index -> unit
    collector = UnitCollector()
    done_units, images, examples = 0, 0, []
    t_start, t_report = time.time(), time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for finished in collector.add(batch):  # for each finished unit: commit
            table = commit_unit(output, meta, unit_of[finished.part_index], finished)
            done_units += 1
            images += table.num_rows
            for f in finished.failures[: max(0, 5 - len(examples))]:
                examples.append(f)
                say(f"vqtok tokenize: skipped {f.key!r} in {f.unit}: {f.reason}", flush=True)
            _check_failures(output, cfg, final=False)
        now = time.time()
        if now - t_report >= cfg.progress_seconds:
            t_report = now
            say(_progress(done_units, len(pending), images, now - t_start, output), flush=True)
    if collector.in_flight:
        raise RuntimeError(f"{collector.in_flight} units did not complete; re-run the same command to finish them")
    say(_progress(done_units, len(pending), images, time.time() - t_start, output), flush=True)
    return images, examples, time.time() - t_start


class _StoredBundle:
    """A small handle to the bundle bytes in Ray's object store: actors fetch one shared copy,
    and a restarted actor fetches it again (the driver keeps the reference alive)."""

    def __init__(self, ref):
        self.refs = [ref]  # in a list, so Ray passes the handle rather than resolving it

    def __call__(self):
        import ray

        return ray.get(self.refs[0])


def _progress(done: int, total: int, images: int, elapsed: float, output: TokenWriter) -> str:
    rate = images / max(elapsed, 1e-9)
    eta = elapsed / done * (total - done) if done else float("nan")
    eta_s = fmt_duration(eta) if done else "?"
    return (f"vqtok tokenize: units {done}/{total} | images {images:,} | {_rate(rate)} img/s | "
            f"skipped {output.failures} | eta {eta_s}")


def _check_failures(output: TokenWriter, cfg: TokenizeConfig, final: bool) -> None:
    damaged, units = output.damaged_units, len(output.committed)
    if units and (final or units >= 20) and damaged / units > cfg.max_failure_fraction:
        raise DataError(
            f"{damaged} of {units} input units are damaged (cut short or unreadable: how many images they lost "
            f"is unknown; see {cfg.out}/{ERRORS_DIR}/), more than --max-failure-fraction {cfg.max_failure_fraction}. "
            f"Replace the damaged inputs (a re-run redoes a unit whose file changed), or raise --max-failure-fraction"
        )
    failed = output.failures  # totals over every committed unit
    seen = failed + output.rows
    if not seen or (not final and seen < 1000):
        return
    if failed / seen > cfg.max_failure_fraction:
        raise DataError(
            f"{failed} of {seen} input images ({failed / seen:.1%}) could not be tokenized, more than "
            f"--max-failure-fraction {cfg.max_failure_fraction}; the reasons are in {cfg.out}/{ERRORS_DIR}/. "
            f"Fix or drop the bad inputs, or raise --max-failure-fraction if they are expected"
        )


def _plan_note(p: Plan) -> str:
    """The inputs that changed or went since the dataset's last run, for the first line and the summary."""
    notes = [f"{len(p.changed)} changed since committed (re-tokenized: {list_some(p.changed)})"] if p.changed else []
    notes += [f"{len(p.kept)} no longer among the inputs, rows kept: {list_some(p.kept)}"] if p.kept else []
    notes += [f"{len(p.dropped)} no longer among the inputs, rows dropped: {list_some(p.dropped)}"] if p.dropped else []
    notes += [f"{len(p.uncaptioned)} written by a vqtok before captions: their rows stay and read with null captions "
              f"(to caption them, tokenize into a new --out)"] if p.uncaptioned else []
    return "; units " + "; ".join(notes) if notes else ""



def _summary(r: TokenizeResult) -> str:
    if r.units_run == 0:
        return (f"vqtok tokenize: nothing to do: all {r.units_total} units are already committed in {r.out} "
                f"({r.rows:,} rows in {r.parts} parts)" + _plan_note(r.plan))
    lines = [
        f"vqtok tokenize: done in {fmt_duration(r.seconds)}: {r.images_run:,} images from {r.units_run} units "
        f"({_rate(r.images_per_s)} img/s end to end)",
        f"  dataset {r.out}: {r.rows:,} rows in {r.parts} parts, {_fmt_bytes(r.bytes)}"
        + (f" ({r.units_skipped} units were already there)" if r.units_skipped else ""),
        *([f"  inputs since the last run:{_plan_note(r.plan).removeprefix(';')}"] if _plan_note(r.plan) else []),
        f"  skipped inputs: {r.failures}" + (f" (one record each in {r.out}/{ERRORS_DIR}/)" if r.failures else ""),
        f"  {describe_captions(r.captions)}" + (f" (repaired and unusable ones are recorded in {r.out}/{ERRORS_DIR}/)"
                                               if r.captions["repaired"] or r.captions["unusable"] else ""),
        f"  read it with vqtok.TokenDataset({r.out!r}) or `vqtok inspect {r.out}`",
    ]
    return "\n".join(lines)


def _rate(x: float) -> str:
    """12,345 / 123 / 4.6 / 0.35: enough digits to read a slow 256px run too."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


COMMAND = Command("tokenize", "tokenize images into a Parquet token dataset (Ray Data)", TokenizeConfig, run)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
