"""Captions: what carrying text costs, and the text side's own jobs, side by side in one run, on real
captioned images (openclipart's 8,121 public-domain drawings with their authors' titles; see
benchmarks/make_captioned_sample.py).

    python benchmarks/captions.py [--only corpus,tokenize,text,export] [--count all] [--size 28]
                                  [--shard-size 500] [--rounds 5] [--vocab 1000,4000] [--scale 10]
                                  [--budget tokenize=420,...] [--no-append]

Stages (each in a fresh process, stopped when it runs past its time budget; the row then says so):

  corpus    the drawings rendered at --size px (rsvg-convert), as img2dataset-style shards of
            --shard-size (KEY.png, KEY.txt, KEY.json) and their caption-less twins (KEY.png only:
            same keys, images and split); cached under benchmarks/out/captions/
  tokenize  `vqtok.tokenize` on the twins, with captions (and --keep-columns url,keywords), with
            captions keeping no metadata, and without: the same images, the same units. One process,
            Ray up once, a warm-up run of each, then --rounds rounds of A B C (alternated), each into
            a fresh output directory; before Ray starts, the read tasks' code (read + decode, no
            encoder) on every unit of each, timed in the same process.
            Bar: with captions (keeping url, keywords) within 5% of without (median times' ratio <= 1.05).
  text      `vqtok.train_text_tokenizer` on the captions (all the titles) at each --vocab size:
            training, the round-trip check of every caption, distinct words, the whole call's time
  export    `vqtok export-lm --workers 1` (a fresh process: Ray start-up, export, exit) on the token
            dataset of the N drawings and on one of --scale x N rows (the shards copied --scale
            times under other keys), text tokenizer: the BPE the text stage trained (else bytes).
            rows/s and peak RSS of the process tree (driver and Ray workers); flat memory is the
            claim: bar peak RSS(scale x N) <= 1.25x peak RSS(N), as for tokenize.

The tokenizer: tests/conftest.py's tiny bundle (width 32, code dim 16, K=32, 28 px, 7x7 tokens, random
weights; benchmarks/out/chaos/tokenizer-tiny when bench-chaos made it, else made the same way here):
the cost of text is measured against the cheapest encoder, where it shows most.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table
from tokenize_throughput import PeakRSS

OUT = Path(__file__).parent / "out" / "captions"
BIN = Path(sys.executable).parent
STAGES = ("corpus", "tokenize", "text", "export")
BUDGET = {"corpus": 300, "tokenize": 420, "text": 180, "export": 420}  # seconds; a full run ~15 min on 2 cores
KEEP = ["url", "keywords"]


class OverBudget(Exception):
    pass


def child(code: str, budget: float, *, argv: list[str] | None = None) -> tuple[str, float, int]:
    """Run python code (or argv) in a fresh process group within `budget` seconds: (stdout, wall
    seconds, peak RSS of the group). Raises OverBudget when it runs past it."""
    t = time.perf_counter()
    p = subprocess.Popen(argv or [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1"))
    rss = PeakRSS(p.pid)
    try:
        out, err = p.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        rss.stop()
        raise OverBudget(f"stopped after {budget:.0f} s (its budget)") from None
    wall = time.perf_counter() - t
    peak = rss.stop()
    try:
        os.killpg(p.pid, signal.SIGKILL)  # Ray helpers that outlive the driver
    except ProcessLookupError:
        pass
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{err[-3000:]}")
    return out, wall, peak


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --- corpus ---------------------------------------------------------------------------------------
def corpus_dir(a) -> Path:
    return OUT / f"openclipart-{a.count}-{a.size}px-{a.shard_size}"


def corpus(a, budget: float) -> dict:
    folder = corpus_dir(a)
    if not (folder / "_done").exists():
        if folder.exists():
            shutil.rmtree(folder)
        child("", budget, argv=[sys.executable, str(Path(__file__).with_name("make_captioned_sample.py")),
                                "--out", str(folder), "--count", str(a.count), "--size", str(a.size),
                                "--shard-size", str(a.shard_size), "--forms", "shards,plain", "--jobs", "2"])
        (folder / "_done").write_text("")
    index = json.loads((folder / "index.json").read_text())
    tars = sorted((folder / "shards").glob("*.tar"))
    return {"folder": folder, "count": index["count"], "units": len(tars),
            "bytes_with": sum(f.stat().st_size for f in tars),
            "bytes_without": sum(f.stat().st_size for f in (folder / "plain").glob("*.tar")),
            "titles": [r["title"] for r in index["rows"]], "rsvg_failed": len(index["rsvg_failed"])}


def tiny_bundle() -> tuple[Path, str]:
    existing = Path(__file__).parent / "out" / "chaos" / "tokenizer-tiny"
    if (existing / "model.safetensors").exists():
        return existing, "benchmarks/out/chaos/tokenizer-tiny (bench-chaos's)"
    bundle = OUT / "tokenizer-tiny"
    if not (bundle / "model.safetensors").exists():
        import torch
        from vqtok import Tokenizer, VQVAEConfig
        from vqtok.models import VQVAE

        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(width=32, code_dim=16, codebook_size=32, res_blocks=1))
        with torch.no_grad():
            model.quantizer.codebook.normal_()
        Tokenizer(model).save(bundle)
    return bundle, "made here as tests/conftest.py make_bundle does (seed 0)"


def token_dataset(bundle: Path, data: Path, out: Path, budget: float) -> Path:
    """A captioned token dataset of `data` (tokenize is exactly-once: a second call adds nothing)."""
    code = textwrap.dedent(f"""
        import vqtok
        vqtok.tokenize({str(bundle)!r}, {str(data)!r}, {str(out)!r}, keep_columns={KEEP!r}, verbose=False)
        print("{{}}")
    """)
    child(code, budget)
    return out


def scaled_shards(src: Path, scale: int) -> Path:
    """The shards copied `scale` times, copy j's keys prefixed "cJ-" (so every row has its own key)."""
    folder = src.parent / f"shards-x{scale}"
    if (folder / "_done").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        for j in range(scale):
            with tarfile.open(folder / f"c{j:02d}-{tar.name}", "w", format=tarfile.USTAR_FORMAT) as out:
                for m, data in members:
                    info = tarfile.TarInfo(f"c{j:02d}-{m.name}")
                    info.size, info.mode = len(data), 0o644
                    out.addfile(info, io.BytesIO(data))
    (folder / "_done").write_text("")
    return folder


# --- tokenize: with captions vs without -----------------------------------------------------------
def tokenize_stage(a, c: dict, bundle: Path, budget: float) -> dict:
    work = OUT / "tokenize-runs"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import json, time, vqtok
        import pyarrow as pa
        from vqtok import Tokenizer
        from vqtok.jobs._ray import init_ray
        from vqtok.pipeline.captions import TextFields
        from vqtok.pipeline.sources import list_units
        from vqtok.pipeline.stages import read_units, unit_items

        data = {{"with": {str(c['folder'] / 'shards')!r}, "bare": {str(c['folder'] / 'shards')!r},
                 "without": {str(c['folder'] / 'plain')!r}}}
        opts = {{"with": dict(keep_columns={KEEP!r}), "bare": {{}}, "without": {{}}}}
        # read + decode in this process, no Ray (a read task's work), each kind once, all units
        pre = Tokenizer.load({str(bundle)!r}).preprocess
        read = {{}}
        for kind in ("with", "bare", "without"):
            items = pa.Table.from_pylist(unit_items([(u, i) for i, u in enumerate(list_units(data[kind]))]))
            t = time.perf_counter()
            n = sum(b.num_rows for b in read_units(items, preprocess=pre, batch_size=256, max_pixels=1 << 26,
                                                   text=TextFields(keep_columns=tuple(opts[kind].get("keep_columns", ())))))
            read[kind] = time.perf_counter() - t
        init_ray(None)
        runs = {{"with": [], "bare": [], "without": []}}
        n = 0
        def once(kind, record=True):
            global n
            n += 1
            out = {str(work)!r} + f"/{{n:02d}}-{{kind}}"
            t = time.perf_counter()
            r = vqtok.tokenize({str(bundle)!r}, data[kind], out, verbose=False, **opts[kind])
            wall = time.perf_counter() - t
            assert r.rows == {c['count']} and r.units_run == {c['units']}, (r.rows, r.units_run)
            if record:
                runs[kind].append({{"wall": wall, "stream": r.stream_seconds, "captioned": r.captions["captioned"],
                                    "bytes": r.bytes}})
        for kind in runs:
            once(kind, False)  # warm-up: Ray's workers, imports, page cache
        for _ in range({a.rounds}):
            for kind in runs:
                once(kind)
        print(json.dumps({{"runs": runs, "read": read}}))
    """)
    out, wall, _ = child(code, budget)
    return dict(last_json(out), wall=wall)


# --- text: train-text-tokenizer on the titles -----------------------------------------------------
def text_stage(a, tokens: Path, budget: float) -> list[dict]:
    rows = []
    for v in a.vocab:
        path = OUT / f"text-bpe-{v}.json"
        code = textwrap.dedent(f"""
            import json, time, vqtok
            t = time.perf_counter()
            r = vqtok.train_text_tokenizer({str(tokens)!r}, {v}, {str(path)!r})
            wall = time.perf_counter() - t
            print(json.dumps(dict(vocab=r.vocab_size, captions=r.captions, nulls=r.null_captions,
                                  words=r.distinct_words, bad=r.not_round_trip, train=r.train_seconds,
                                  check=r.check_seconds, seconds=r.seconds, wall=wall)))
        """)
        out, wall, peak = child(code, budget)
        rows.append(dict(last_json(out), asked=v, process=wall, rss=peak, file=path))
    return rows


# --- export-lm at N and scale x N rows ------------------------------------------------------------
def export_stage(a, small: Path, large: Path, text: str, budget: float) -> list[dict]:
    rows = []
    for tokens in (small, large):
        out = OUT / f"export-{tokens.name}"
        if out.exists():
            shutil.rmtree(out)
        code = textwrap.dedent(f"""
            import json, vqtok
            r = vqtok.export_lm({str(tokens)!r}, {text!r}, {str(out)!r}, workers=1, verbose=False)
            assert r.complete
            print(json.dumps(dict(rows=r.rows_run, images=r.images_run, parts=r.parts_run, seconds=r.seconds,
                                  export_seconds=r.export_seconds, ids=r.ids, bytes=r.bytes)))
        """)
        stdout, wall, peak = child(code, budget)
        rows.append(dict(last_json(stdout), tokens=tokens.name, wall=wall, rss=peak))
    return rows


def secs(runs: list[dict]) -> str:
    return ", ".join(f"{x['wall']:.2f}" for x in runs)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    p.add_argument("--count", default="all", help="drawings (or 'all': 8,121)")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vocab", default="1000,4000")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--budget", default="", help="per-stage seconds, e.g. tokenize=600,export=300 "
                                                f"(default {','.join(f'{k}={v}' for k, v in BUDGET.items())})")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args()
    a.vocab = [int(v) for v in a.vocab.split(",") if v]
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    if set(only) - set(STAGES):
        p.error(f"--only: unknown stage(s) {sorted(set(only) - set(STAGES))}; stages: {', '.join(STAGES)}")
    budget = dict(BUDGET, **{k: float(v) for k, v in (x.split("=") for x in a.budget.split(",") if x)})
    OUT.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cores = os.cpu_count() or 1
    sections, bars = [], []

    t = time.perf_counter()
    c = corpus(a, budget["corpus"])  # every stage needs it (cached after the first run)
    bundle, bundle_note = tiny_bundle()
    distinct = len(set(c["titles"]))
    empty = sum(not (x or "").strip() for x in c["titles"])
    head = (f"{c['count']:,} openclipart drawings (Debian openclipart-svg; public domain) at {a.size} px, rendered "
            f"by rsvg-convert ({c['rsvg_failed']} failed), in {c['units']} WebDataset shards of {a.shard_size}: "
            f"{c['bytes_with'] / 2**20:,.1f} MiB with KEY.txt + KEY.json, {c['bytes_without'] / 2**20:,.1f} MiB "
            f"without. Titles: {distinct:,} distinct, {empty} empty. Tokenizer: tiny (width 32, code dim 16, K=32, "
            f"7x7 tokens, random weights), {bundle_note}.")
    print(head, f"[corpus {time.perf_counter() - t:.0f} s]", flush=True)
    tokens_n = OUT / f"tokens-{c['count']}"

    if "tokenize" in only:
        try:
            load = os.getloadavg()
            r = tokenize_stage(a, c, bundle, budget["tokenize"])
            load = (load, os.getloadavg())
            w, bare, wo = r["runs"]["with"], r["runs"]["bare"], r["runs"]["without"]
            med = {k: median([x["wall"] for x in v]) for k, v in r["runs"].items()}
            rows = []
            for kind, name in (("with", "with captions (KEY.txt, KEY.json; keep url, keywords)"),
                               ("bare", "with captions (KEY.txt, KEY.json; keep nothing)"),
                               ("without", "without (KEY.png only)")):
                runs = r["runs"][kind]
                rows.append([name, f"{med[kind]:.2f}", f"{min(x['wall'] for x in runs):.2f}",
                             f"{median([x['stream'] for x in runs]):.2f}", f"{c['count'] / med[kind]:,.0f}",
                             f"{med[kind] / med['without']:.3f}x", f"{c['count'] / r['read'][kind]:,.0f}",
                             f"{runs[0]['captioned']:,}", f"{runs[0]['bytes'] / 2**20:,.2f}"])
            ratio = med["with"] / med["without"]
            ratio_best = min(x["wall"] for x in w) / min(x["wall"] for x in wo)
            ratio_stream = median([x["stream"] for x in w]) / median([x["stream"] for x in wo])
            body = table([f"vqtok.tokenize, {c['count']:,} images, {c['units']} units", "median s", "best s",
                          "median s once Ray is up", "img/s (median)", "of without", "read + decode img/s (1 core)",
                          "rows with a caption", "dataset MiB"], rows)
            body += (f"\n\nWith / without: {ratio:.3f}x (median of {a.rounds}), {ratio_best:.3f}x (best), "
                     f"{ratio_stream:.3f}x (median, Ray pipeline only); keeping no metadata: "
                     f"{med['bare'] / med['without']:.3f}x. Runs alternated (with, with keeping nothing, without) "
                     f"x {a.rounds} after one warm-up run of each, one process with Ray up, a fresh output directory "
                     f"each; runs (s): with {secs(w)}; keeping nothing {secs(bare)}; without {secs(wo)}. Read + "
                     f"decode: every unit read by the read tasks' code (pipeline/stages.py read_units) in one "
                     f"process without Ray, once each, before Ray started. Load average (1 min) {load[0][0]:.1f} before the "
                     f"stage, {load[1][0]:.1f} after (other work on the machine shows as noise between rounds).")
            bars.append(("tokenize with captions within 5% of without (median)", ratio <= 1.05))
        except OverBudget as e:
            body = f"Not measured: {e}."
        sections.append(("Carrying text through tokenize", body))
        print(body, flush=True)

    text_file = None
    if "text" in only:
        try:
            token_dataset(bundle, c["folder"] / "shards", tokens_n, budget["text"])
            rs = text_stage(a, tokens_n, budget["text"])
            rows = [[f"{x['asked']:,}", f"{x['vocab']:,}", f"{x['captions']:,}", f"{x['nulls']:,}", f"{x['words']:,}",
                     f"{x['train']:.2f}", f"{x['check']:.2f}", f"{x['seconds']:.2f}", f"{x['process']:.1f}",
                     f"{x['rss'] / 2**20:,.0f}", "every caption" if x["bad"] == 0 else f"{x['bad']} do NOT"]
                    for x in rs]
            body = table(["vocab asked", "ids", "captions", "null", "distinct words", "train s", "check s",
                          "call s", "process s", "peak RSS MiB", "round trip"], rows)
            body += (f"\n\n`vqtok.train_text_tokenizer` on the token dataset of the {c['count']:,} drawings (their "
                     f"titles: {distinct:,} distinct); 'call s' is the call's own time (both passes and writing the "
                     f"file), 'process s' a fresh Python process's (imports included).")
            bars.append(("train-text-tokenizer: every caption decodes back", all(x["bad"] == 0 for x in rs)))
            text_file = str(rs[-1]["file"])
        except OverBudget as e:
            body = f"Not measured: {e}."
        sections.append(("train-text-tokenizer on the openclipart titles", body))
        print(body, flush=True)

    if "export" in only:
        try:
            if text_file is None:
                found = sorted(OUT.glob("text-bpe-*.json"))
                text_file = str(found[-1]) if found else "bytes"
            token_dataset(bundle, c["folder"] / "shards", tokens_n, budget["export"])
            big = scaled_shards(c["folder"] / "shards", a.scale)
            tokens_big = token_dataset(bundle, big, OUT / f"tokens-{c['count']}x{a.scale}", budget["export"])
            rs = export_stage(a, tokens_n, tokens_big, text_file, budget["export"])
            rows = [[f"{x['rows']:,}", f"{x['parts']}", f"{x['ids'] / x['rows']:,.1f}", f"{x['bytes'] / 2**20:,.1f}",
                     f"{x['wall']:.1f}", f"{x['rows'] / x['wall']:,.0f}", f"{x['export_seconds']:.1f}",
                     f"{x['rows'] / x['export_seconds']:,.0f}", f"{x['rss'] / 2**20:,.0f}"] for x in rs]
            ratio = rs[1]["rss"] / max(rs[0]["rss"], 1)
            body = table(["export-lm --workers 1, rows", "parts", "ids/row", "MiB", "process s",
                          "rows/s (process)", "export s", "rows/s (export, 1 worker)", "peak RSS MiB"], rows)
            body += (f"\n\nPeak RSS {ratio:.2f}x at {a.scale}x the rows. A fresh process each running "
                     f"`vqtok.export_lm(..., workers=1)` (text-first rows, the defaults); 'process s' is the whole "
                     f"process (imports, Ray start-up, export, exit), 'export s' the job's own export_seconds (first "
                     f"task's start to last record); peak RSS: the process group's summed RSS (driver and Ray workers), "
                     f"sampled every 0.2 s; text tokenizer {Path(text_file).name if text_file != 'bytes' else 'bytes'}; the "
                     f"{a.scale}x dataset is the shards copied {a.scale} times under other keys. One export worker: "
                     f"rows/s is per export core ({cores} cores here, shared with Ray's own processes).")
            bars.append((f"export-lm peak RSS at {a.scale}x rows <= 1.25x", ratio <= 1.25))
        except OverBudget as e:
            body = f"Not measured: {e}."
        sections.append(("export-lm throughput and memory", body))
        print(body, flush=True)

    body = head + "\n\n" + "\n\n".join(f"**{t}**\n\n{b}" for t, b in sections)
    if bars:
        body += "\n\nBars: " + "; ".join(f"{n} {'PASS' if ok else 'FAIL'}" for n, ok in bars)
    body += f"\nWhole run ({', '.join(only)}): {(time.perf_counter() - t_all) / 60:.1f} min."
    print("\n" + body)
    if not a.no_append:
        append_results(f"Captions: cost of carrying text, train-text-tokenizer, export-lm (benchmarks/captions.py "
                       f"--only {','.join(only)})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
