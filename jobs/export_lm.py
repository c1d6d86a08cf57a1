"""A token dataset as rows of text and image ids in one vocabulary, for language-model trainers:
`vqtok export-lm --tokens DATASET --text-tokenizer T --out DIR` / `python -m vqtok.jobs.export_lm`
(the Ray Jobs entry point) / `vqtok.export_lm(...)`; one code path.

    result = vqtok.export_lm("runs/demo/tokens", "bytes", "runs/export")             # text-first rows
    vqtok.export_lm("tokens", "llm/tokenizer.json", "export", order="both", pack=2048)
    datasets.load_dataset("parquet", data_files="runs/export/data/*.parquet")      # or ray.data / pyarrow
    tokenizers.Tokenizer.from_file("runs/export/tokenizer.json").decode(row, skip_special_tokens=True)

The layout of the ids (models/vocabulary.py): the text tokenizer's ids unchanged, then <pad> <bos>
<eot> <boi> <eoi>, then <img_0> .. <img_{K-1}>; a sample is `<bos> caption <boi> image <eoi>`
(text-first) or `<bos> <boi> image <eoi> caption <eot>` (image-first). The files, columns, packing
rules and metadata: pipeline/lm_export.py.

How it runs: the driver opens the token dataset (committed parts only) and the export directory,
plans (a part already exported from the same source bytes with the same options is skipped; a part
whose source part is gone is removed), then runs one Ray task per export part, at most --workers at
a time. A task streams its source part in record batches (captions encoded with the text
tokenizer's encode_batch per batch) into a streaming Parquet writer and puts the finished file in
place whole; the driver only records what the tasks wrote in DIR/_export.json. Memory stays flat:
one record batch per task, one record per part on the driver.

Exactly once: every part is a deterministic function of its source part (its sha256 in the token
dataset's manifest) and the options (fingerprinted in _export.json). Kill it at any point and run
the same command again: parts recorded are kept, the rest are redone, and the export ends up byte
for byte what a clean run writes. A run with other options into an existing DIR is refused, naming
what differs. The manifest says "complete": true when every part is in place.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from ..models.config import Config, ConfigError, option
from ..models.text_tokenizer import BYTES, TextTokenizer
from ..models.vocabulary import ORDERS, SEQUENCE_LAYOUTS, Vocabulary
from ..pipeline import lm_export as lm
from ..pipeline.errors import DataError
from ._ray import check_address, check_resources, init_ray
from .options import Command, job_main
from .progress import fmt_duration
from .rundir import is_url

MANIFEST_EVERY = 2.0  # seconds: the driver records finished parts in _export.json at most this often (and at the end)


@dataclass(kw_only=True)
class ExportLMConfig(Config):
    WHAT = "export-lm config"
    tokens: str = option("", "the token dataset to export (the --out of vqtok tokenize)")
    text_tokenizer: str = option("", 'text tokenizer: a Hugging Face tokenizer.json (path or URL) or "bytes"')
    out: str = option("", "the export directory or URL (s3://bucket/prefix)")
    order: str = option("text-first", "text-first (caption, then image), image-first (image, then caption and "
                                      "<eot>) or both (each image once each way)")
    pack: int | None = option(None, "pack samples into rows of exactly this many ids (default: one row per sample)",
                              metavar="SEQ_LEN")
    max_text_tokens: int = option(128, "captions keep their first N text ids (the rest is cut, counted)")
    workers: int = option(1, "export parts written at once (one Ray task, one CPU each)")
    address: str | None = option(None, "Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS if set, "
                                       "else an embedded local Ray)")
    progress_seconds: float = option(10.0, "seconds between progress lines")
    row_group_rows: int = option(lm.ROW_GROUP_ROWS, "images per record batch (one Parquet row group)", cli=False)
    verbose: bool = option(True, "print progress and the summary", cli=False)

    def __post_init__(self):
        if not self.tokens:
            raise ConfigError("--tokens is required: the token dataset to export (the --out of vqtok tokenize)")
        if not self.text_tokenizer:
            raise ConfigError('--text-tokenizer is required: a Hugging Face tokenizer.json (path or URL), or "bytes" '
                              "(UTF-8 bytes, no file needed)")
        if not self.out:
            raise ConfigError("--out is required: the export directory (or s3://bucket/prefix)")
        if self.order not in ORDERS:
            raise ConfigError(f"--order {self.order!r}: expected one of {', '.join(ORDERS)}")
        if self.pack is not None and self.pack < 1:
            raise ConfigError(f"--pack {self.pack}: must be a positive sequence length (or leave it out for one row "
                              f"per sample)")
        if self.max_text_tokens < 0:
            raise ConfigError(f"--max-text-tokens {self.max_text_tokens}: must be 0 (no caption ids) or more")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")
        if self.row_group_rows < 1:
            raise ConfigError(f"row_group_rows {self.row_group_rows}: must be at least 1")


@dataclass
class ExportResult:
    out: str
    complete: bool
    parts: int  # export parts now (one per committed token-dataset part)
    parts_run: int  # written by this run
    parts_skipped: int  # already exported from the same source bytes with the same options
    parts_removed: int  # removed: their source part is gone from the token dataset
    images: int  # over the whole export
    samples: int  # sequences: images x orders
    rows: int  # Parquet rows: samples, or packed rows with --pack
    ids: int  # ids written, <pad> included
    pad_ids: int
    captions_cut: int  # images whose caption was cut by --max-text-tokens
    empty_captions: int  # images with no caption ids (null caption): their sequences have the empty caption
    bytes: int
    layout: dict  # Vocabulary.to_dict()
    rows_run: int = 0  # rows written by this run
    images_run: int = 0
    seconds: float = 0.0
    rows_per_s: float = 0.0  # rows_run / seconds (the whole command, Ray start-up included)
    images_per_s: float = 0.0
    export_seconds: float = 0.0  # from the first task's start to the last record
    files: list[str] = field(default_factory=list)  # the parts' URLs, in order


def export_lm(tokens: str, text_tokenizer: str, out: str, **options) -> ExportResult:
    """Export the token dataset `tokens` as rows of ids in one vocabulary of `text_tokenizer`'s ids
    and the image codes, into `out`. Options: the fields of ExportLMConfig (order, pack,
    max_text_tokens, workers, address, ...)."""
    return run(ExportLMConfig(tokens=str(tokens), text_tokenizer=str(text_tokenizer), out=str(out), **options))


def _load_text(spec: str) -> tuple[TextTokenizer, tuple[str, bytes]]:
    """The text tokenizer, and what the tasks rebuild it from: ("bytes", b"") or ("hf", the file's bytes)."""
    if spec == BYTES:
        return TextTokenizer.load(BYTES), (BYTES, b"")
    import fsspec

    fix = 'give a Hugging Face tokenizer.json (a path or URL) or "bytes"'
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        if fs.isdir(path):
            path = path.rstrip("/") + "/tokenizer.json"
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--text-tokenizer {spec}: no such file; {fix}") from None
    try:
        text = TextTokenizer.from_json(data, name="/".join(path.split("/")[-2:]), where=spec)
    except ConfigError as e:
        raise ConfigError(str(e).replace("text tokenizer", "--text-tokenizer", 1)) from None
    return text, ("hf", data)


def _check_pack(cfg: ExportLMConfig, vocab: Vocabulary) -> None:
    if cfg.pack is None:
        return
    longest, shortest = lm.longest_sample(vocab, cfg.order), lm.shortest_sample(vocab, cfg.order)
    h, w = vocab.grid
    eot = " and <eot>" if "image-first" in lm.orders_of(cfg.order) else ""
    if cfg.pack < shortest:
        raise ConfigError(f"--pack {cfg.pack} is too small: a sample with no caption is already {shortest} ids "
                          f"(<bos> <boi>, {h}x{w} = {vocab.image_span} image ids, <eoi>{eot if shortest > 3 + vocab.image_span else ''}); "
                          f"give --pack {longest} or more (a sample is never split across rows)")
    if cfg.pack < longest:
        fits = cfg.max_text_tokens - (longest - cfg.pack)
        raise ConfigError(f"--pack {cfg.pack} is shorter than the longest sample: {longest} ids (<bos>, up to "
                          f"--max-text-tokens {cfg.max_text_tokens} caption ids, <boi>, {h}x{w} = {vocab.image_span} "
                          f"image ids, <eoi>{eot}), and a sample is never split across rows; give --pack {longest} or "
                          f"more, or --max-text-tokens {fits} or less")


def _source(tokens: str) -> str:
    return tokens.rstrip("/") if is_url(tokens) else os.path.abspath(tokens.removeprefix("file://"))


def run(cfg: ExportLMConfig) -> ExportResult:
    import fsspec

    from ..pipeline.token_dataset import TokenDataset

    check_address(cfg.address)
    t0 = time.time()
    say = print if cfg.verbose else (lambda *a, **k: None)
    try:
        ds = TokenDataset(cfg.tokens)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--tokens {e}") from None
    if not ds.parts:
        raise DataError(f"--tokens {cfg.tokens} holds no committed parts yet (is `vqtok tokenize` still running?); "
                        f"export it once it has rows")
    text, text_spec = _load_text(cfg.text_tokenizer)
    vocab = Vocabulary(text.vocab_size, text.id, ds.codebook_size, ds.grid, ds.tokenizer_id, cfg.max_text_tokens)
    _check_pack(cfg, vocab)
    spec = lm.ExportSpec(vocab.to_dict(), cfg.order, cfg.pack, cfg.row_group_rows)
    options = spec.options()
    fp = lm.fingerprint(options)
    out = cfg.out.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    try:
        manifest = lm.read_manifest(fs, root)
    except PermissionError as e:
        raise ConfigError(f"--out {cfg.out}: cannot read there ({e}); choose a readable and writable --out") from None
    if manifest is None:
        _refuse_foreign(fs, root, cfg.out)
        manifest = {"format": lm.FORMAT, "version": lm.VERSION, "parts": {}}
    elif manifest.get("fingerprint") != fp:
        raise ConfigError(_differs(manifest.get("options", {}), options, cfg.out))
    try:
        tokenizer_json = vocab.extend(text).to_str(pretty=True).encode()
    except ValueError as e:
        raise ConfigError(f"--text-tokenizer {cfg.text_tokenizer}: {e}") from None
    source = _source(cfg.tokens)

    # --- the plan -----------------------------------------------------------------------------
    planned: dict[str, tuple[int, object]] = {}
    for part in ds.parts:
        index = lm.source_index(part.name)
        name = lm.part_file(index)
        if name in planned:
            raise DataError(f"--tokens {cfg.tokens}: parts {planned[name][1].name} and {part.name} have the same part "
                            f"number; not a dataset vqtok tokenize wrote")
        planned[name] = (index, part)
    on_disk = _ls_sizes(fs, f"{root}/{lm.DATA_DIR}")
    recorded = manifest["parts"]
    todo, skipped = [], []
    for name, (index, part) in planned.items():
        r = recorded.get(name)
        if (r is not None and r["source_sha256"] == part.sha256 and r["source_part"] == part.name
                and on_disk.get(name.rsplit("/", 1)[-1]) == r["bytes"]):
            skipped.append(name)
        else:
            todo.append((name, index, part))
    removed = sorted(n for n in recorded if n not in planned)
    strays = sorted(n for n in on_disk if f"{lm.DATA_DIR}/{n}" not in planned)
    result = _result(cfg, manifest, vocab, planned, 0, 0, 0)

    def layout_json() -> bytes:
        return lm.dumps({**vocab.to_dict(), "export": _export_facts(cfg, spec, text, source, _totals(manifest, planned))})

    if (not todo and not removed and not strays and manifest.get("complete")
            and lm.read_bytes(fs, f"{root}/{lm.TOKENIZER_FILE}") == tokenizer_json
            and lm.read_bytes(fs, f"{root}/{lm.LAYOUT_FILE}") == layout_json()):
        result.complete, result.parts_skipped, result.seconds = True, len(skipped), time.time() - t0
        say(f"vqtok export-lm: nothing to do: all {len(planned)} parts of {cfg.tokens} are already exported in "
            f"{cfg.out} with these options ({result.rows:,} rows); the export is complete", flush=True)
        return result

    say(f"vqtok export-lm: {len(planned)} parts in {cfg.tokens} ({ds.num_rows:,} images, grid {vocab.grid[0]}x"
        f"{vocab.grid[1]}, K={vocab.codebook_size}); {len(skipped)} already exported, {len(todo)} to do"
        + (f", {len(removed)} removed (their source part is gone)" if removed else "")
        + f"; text tokenizer {text.name}, vocabulary {vocab.size:,} ids (text {vocab.text_vocab_size:,}, image "
          f"from {vocab.image_offset:,}); order {cfg.order}" + (f", packed to {cfg.pack} ids" if cfg.pack else ""),
        flush=True)

    # --- write: the manifest first (so a killed run's DIR is known as ours), then the parts ---
    for name in removed:
        del recorded[name]
    manifest.update(options=options, fingerprint=fp, source=source, complete=False)
    manifest.pop("totals", None)
    try:
        lm.put_whole(fs, root, lm.MANIFEST, lm.dumps(manifest))
    except (PermissionError, OSError) as e:
        raise ConfigError(f"--out {cfg.out}: cannot write there ({type(e).__name__}: {e}); choose a writable --out") from None
    if lm.read_bytes(fs, f"{root}/{lm.TOKENIZER_FILE}") != tokenizer_json:
        lm.put_whole(fs, root, lm.TOKENIZER_FILE, tokenizer_json)
    _remove(fs, [f"{root}/{lm.DATA_DIR}/{n}" for n in strays] + _ls_files(fs, f"{root}/{lm.STAGING_DIR}"))

    rows_run = images_run = 0
    export_seconds = 0.0
    if todo:
        rows_run, images_run, export_seconds = _run_tasks(cfg, spec, text_spec, fs, root, out, manifest, todo, say)

    # --- finish: what no record names goes, then the layout, then the manifest says complete ---
    strays = [n for n in _ls_sizes(fs, f"{root}/{lm.DATA_DIR}") if f"{lm.DATA_DIR}/{n}" not in planned]
    _remove(fs, [f"{root}/{lm.DATA_DIR}/{n}" for n in strays] + _ls_files(fs, f"{root}/{lm.STAGING_DIR}"))
    if lm.is_local(fs) and os.path.isdir(f"{root}/{lm.STAGING_DIR}"):
        os.rmdir(f"{root}/{lm.STAGING_DIR}")
    lm.put_whole(fs, root, lm.LAYOUT_FILE, layout_json())
    manifest.update(complete=True, totals=_totals(manifest, planned))
    lm.put_whole(fs, root, lm.MANIFEST, lm.dumps(manifest))

    seconds = time.time() - t0
    result = _result(cfg, manifest, vocab, planned, len(todo), len(skipped), len(removed))
    result.complete, result.rows_run, result.images_run = True, rows_run, images_run
    result.seconds, result.export_seconds = seconds, export_seconds
    result.rows_per_s, result.images_per_s = rows_run / max(seconds, 1e-9), images_run / max(seconds, 1e-9)
    say(_summary(result, cfg), flush=True)
    return result


def _run_tasks(cfg, spec, text_spec, fs, root, out, manifest, todo, say) -> tuple[int, int, float]:
    """One Ray task per export part, at most cfg.workers at once; the driver records each part."""
    ray = init_ray(cfg.address)
    check_resources(ray, workers=cfg.workers, gpus_per_worker=0, cpus_per_worker=1.0)
    task = ray.remote(num_cpus=1, max_retries=3)(lm.export_part)
    text_ref = ray.put(text_spec)
    out_url = out if is_url(out) else root  # local: the absolute path, whatever the workers' directory
    waiting = list(todo)
    in_flight: dict = {}
    done = rows = images = ids = 0
    t_start = t_report = time.time()
    t_saved = 0.0  # the first finished part is recorded at once, then at most every MANIFEST_EVERY seconds
    dirty = False
    while waiting or in_flight:
        while waiting and len(in_flight) < cfg.workers:
            name, index, part = waiting.pop(0)
            ref = task.remote(part.url, part.name, part.sha256, out_url, index, spec, text_ref)
            in_flight[ref] = (name, part)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.1, cfg.progress_seconds))
        for ref in ready:
            name, part = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, (DataError, ConfigError)):
                    raise type(cause)(f"export part {name} (from {part.name}): {cause}") from None
                raise
            record.pop("part")
            manifest["parts"][name] = {**record, "source_unit": part.unit}
            dirty = True
            done += 1
            rows += record["rows"]
            images += record["images"]
            ids += record["ids"]
        now = time.time()
        if dirty and (now - t_saved >= MANIFEST_EVERY or not (waiting or in_flight)):
            lm.put_whole(fs, root, lm.MANIFEST, lm.dumps(manifest))
            t_saved, dirty = now, False
        if now - t_report >= cfg.progress_seconds:
            t_report = now
            say(_progress(done, len(todo), rows, ids, now - t_start), flush=True)
    say(_progress(done, len(todo), rows, ids, time.time() - t_start), flush=True)
    return rows, images, time.time() - t_start


def _progress(done: int, total: int, rows: int, ids: int, elapsed: float) -> str:
    eta = fmt_duration(elapsed / done * (total - done)) if done else "?"
    return (f"vqtok export-lm: parts {done}/{total} | rows {rows:,} | ids {ids:,} | "
            f"{rows / max(elapsed, 1e-9):,.0f} rows/s | eta {eta}")


def _totals(manifest: dict, planned: dict) -> dict:
    keys = ("images", "samples", "rows", "ids", "pad_ids", "text_ids", "captions_cut", "empty_captions", "bytes")
    records = [manifest["parts"][n] for n in sorted(planned) if n in manifest["parts"]]
    return {"parts": len(records), **{k: int(sum(r[k] for r in records)) for k in keys}}


def _export_facts(cfg: ExportLMConfig, spec: lm.ExportSpec, text: TextTokenizer, source: str, totals: dict) -> dict:
    """The export's own facts, beside the layout in layout.json."""
    return {
        "format": lm.FORMAT, "version": lm.VERSION,
        "order": cfg.order, "orders": list(lm.orders_of(cfg.order)),
        "sequences": {o: SEQUENCE_LAYOUTS[o] for o in lm.orders_of(cfg.order)},
        "pack": cfg.pack, "max_text_tokens": cfg.max_text_tokens,
        "files": f"{lm.DATA_DIR}/part-NNNNNN.parquet (NNNNNN: the token dataset's part number)",
        "columns": lm.PACKED_COLUMNS if cfg.pack else lm.COLUMNS,
        "packing": ("samples concatenated, each from its own <bos>; never split across rows; a row is filled with "
                    "<pad> when the next sample does not fit; within one part; the last row of a part is padded")
        if cfg.pack else None,
        "text_tokenizer": text.name, "source": source, "counts": totals,
    }


def _result(cfg, manifest, vocab, planned, run_n, skipped_n, removed_n) -> ExportResult:
    t = _totals(manifest, planned)
    base = cfg.out.rstrip("/")
    files = [f"{base}/{n}" for n in sorted(planned) if n in manifest["parts"]]
    return ExportResult(out=cfg.out, complete=bool(manifest.get("complete")), parts=t["parts"], parts_run=run_n,
                        parts_skipped=skipped_n, parts_removed=removed_n, images=t["images"], samples=t["samples"],
                        rows=t["rows"], ids=t["ids"], pad_ids=t["pad_ids"], captions_cut=t["captions_cut"],
                        empty_captions=t["empty_captions"], bytes=t["bytes"], layout=vocab.to_dict(), files=files)


def _differs(old: dict, new: dict, out: str) -> str:
    names = {"order": "--order", "pack": "--pack", "max_text_tokens": "--max-text-tokens",
             "text_tokenizer_id": "--text-tokenizer (id)", "text_vocab_size": "--text-tokenizer (ids)",
             "image_tokenizer_id": "the token dataset's image tokenizer", "codebook_size": "the token dataset's K",
             "grid": "the token dataset's grid", "row_group_rows": "row_group_rows", "format": "format",
             "version": "export version"}
    diffs = [f"{names.get(k, k)} {_show(old.get(k))} -> {_show(new.get(k))}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    was = " ".join(f"{flag} {_show(old.get(k))}" for k, flag in (("order", "--order"), ("pack", "--pack"),
                                                                 ("max_text_tokens", "--max-text-tokens")))
    return (f"--out {out} holds an export made with other options ({'; '.join(diffs) or 'unknown'}): its parts would "
            f"mix two layouts. Give the same options as before ({was}, and the same text tokenizer and token dataset "
            f"tokenizer), export into a new --out, or delete {out} to export again")


def _show(v) -> str:
    if v is None:
        return "none"
    s = str(v)
    return s[:23] + "..." if len(s) > 26 else s


def _refuse_foreign(fs, root: str, out: str) -> None:
    """A new export goes into a missing or empty directory, or one holding only an export's own files
    (a run killed before its first manifest write)."""
    try:
        entries = fs.ls(root, detail=False) if fs.isdir(root) else []
    except FileNotFoundError:
        return
    ours = {lm.DATA_DIR, lm.STAGING_DIR, lm.LAYOUT_FILE, lm.TOKENIZER_FILE, lm.MANIFEST}
    foreign = sorted(n for n in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if n not in ours)
    if foreign:
        raise ConfigError(f"--out {out} exists and holds other files ({', '.join(foreign[:5])}) but no {lm.MANIFEST}: "
                          f"give an empty or new --out for the export")


def _ls_sizes(fs, path: str) -> dict[str, int]:
    """{file name: size} of the part files directly under path (none if it does not exist)."""
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and name.startswith("part-") and name.endswith(".parquet"):
            out[name] = int(e.get("size") or 0)
    return out


def _ls_files(fs, path: str) -> list[str]:
    fs.invalidate_cache(path)
    try:
        return [e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "file"]
    except FileNotFoundError:
        return []


def _remove(fs, paths: list[str]) -> None:
    if paths:
        fs.rm(paths)


def _summary(r: ExportResult, cfg: ExportLMConfig) -> str:
    cut = (f"{r.captions_cut:,} captions cut to --max-text-tokens {cfg.max_text_tokens}" if r.captions_cut else
           f"no caption cut (--max-text-tokens {cfg.max_text_tokens})")
    empty = (f"all {r.images:,} images have no caption: every sequence has the empty caption (unconditional)"
             if r.images and r.empty_captions == r.images else
             f"{r.empty_captions:,} images with no caption (their sequences have the empty caption)")
    shape = f"packed rows of {cfg.pack} ids ({r.pad_ids:,} of them <pad>)" if cfg.pack else "one row per sample"
    lines = [
        f"vqtok export-lm: done in {fmt_duration(r.seconds)}: {r.rows_run:,} rows from {r.parts_run} parts "
        f"({r.rows_per_s:,.0f} rows/s, {r.images_per_s:,.0f} images/s end to end)"
        + (f"; {r.parts_skipped} parts were already exported" if r.parts_skipped else "")
        + (f"; {r.parts_removed} removed (source part gone)" if r.parts_removed else ""),
        f"  export {r.out}: complete: {r.rows:,} rows ({shape}) in {r.parts} parts, {r.samples:,} samples of "
        f"{r.images:,} images, {r.ids:,} ids, {r.bytes / 2**20:,.1f} MiB",
        f"  captions: {cut}; {empty}",
        f"  layout: {r.layout['size']:,} ids: text 0..{r.layout['text_vocab_size'] - 1}, specials "
        + ", ".join(f"{k} {v}" for k, v in r.layout["special_tokens"].items())
        + f", <img_0> at {r.layout['image_offset']:,}; {cfg.out}/{lm.LAYOUT_FILE}, {cfg.out}/{lm.TOKENIZER_FILE}",
        f"  read it: datasets.load_dataset(\"parquet\", data_files=\"{cfg.out}/{lm.DATA_DIR}/*.parquet\"), "
        f"ray.data.read_parquet(\"{cfg.out}/{lm.DATA_DIR}\") or pyarrow",
    ]
    return "\n".join(lines)


COMMAND = Command("export-lm", "export a token dataset as rows of text and image ids in one vocabulary (Parquet, "
                               "for LM trainers)", ExportLMConfig, run)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
