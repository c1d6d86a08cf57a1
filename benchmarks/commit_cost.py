"""What committing one unit to a token dataset costs, as the dataset grows: the commit protocol of
pipeline/token_writer.py (a part, then a small record in _commits/, the manifest rewritten
geometrically) against the one it replaced (the whole manifest rewritten after every commit),
side by side in one run, on local disk and on S3 (a moto server on 127.0.0.1).

    python benchmarks/commit_cost.py [--quick] [--budget 90] [--stores local,s3] [--no-append]

For N = 100, 1,000, 5,000, 20,000 units (--quick: 100 and 1,000) it drives TokenWriter directly
(no Ray, no tokenizer): tiny parts (3 rows of 2x2 tokens, a fake tokenizer's metadata), so the
protocol's own overhead dominates. Per cell it measures
  - ms per commit (TokenWriter.commit: part, record, any compaction), mean over the last 10% of
    the units and over all of them, and the slowest single commit;
  - bytes written per commit (everything passed to TokenWriter._put during the commits): the
    parts, and the protocol's own bytes (commit records + manifest writes);
  - what a reader pays: TokenDataset(OUT) opened just before the last commit (the manifest plus
    the uncompacted commit records), and after close (the manifest alone).
The old protocol is the same writer whose commit folds its record into the manifest at once
(TokenWriter.commit, then compact(): one full manifest write per unit, as before the change, plus
the O(1) record written and deleted). An old-protocol cell whose commits run past --budget seconds
is stopped and reported as skipped; a larger N of it on the same store is then not tried. The new
protocol always runs to the end (on moto its N = 20,000 alone takes 10-15 minutes;
the whole run 20-25 on 2 cores).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

OUT = Path(__file__).parent / "out" / "commit"
SIZES = [100, 1_000, 5_000, 20_000]
QUICK = [100, 1_000]
ROWS = 3  # rows per part


class OverBudget(Exception):
    pass


def writer_classes():
    from vqtok.pipeline import token_writer as td

    class OldProtocolWriter(td.TokenWriter):
        """Before the change: every commit rewrote the whole manifest."""

        def commit(self, *args, **kwargs):
            record = super().commit(*args, **kwargs)
            if self.records:  # not already folded by the geometric rule
                self.compact()
            return record

    return {"new": td.TokenWriter, "old": OldProtocolWriter}


def fixtures(n: int):
    from vqtok.pipeline import token_format as fmt
    from vqtok.pipeline.sources import Unit

    meta = fmt.dataset_metadata(codebook_size=512, tokenizer_id="bench-" + "0" * 58, grid=(2, 2),
                               preprocess={"image_size": 28, "channels": 1}, vqtok_version="bench")
    units = [Unit(url=f"/data/shards/train-{i:06d}.tar", kind="tar", signature=f"{i:016x}") for i in range(n)]
    rng = np.random.default_rng(0)
    tables = [fmt.part_table(meta, [f"{u.url}/{r:04d}" for r in range(ROWS)], rng.integers(0, 512, (ROWS, 2, 2)),
                            list(range(ROWS)), u.url) for u in units[:64]]  # reused round robin
    return meta, units, tables


def run_cell(url: str, protocol: str, n: int, budget: float) -> dict:
    """Open a fresh dataset at url, commit n units with the given protocol, close; measure."""
    from vqtok import TokenDataset
    from vqtok.pipeline import token_format as fmt

    meta, units, tables = fixtures(n)
    cls = writer_classes()[protocol]
    w = cls.open(url, meta, units)
    written = {"part": 0, "record": 0, "manifest": 0, "other": 0}
    tail_from = n - max(1, n // 10)  # the last 10% of the units
    before_tail = None
    real_put = w._put

    def counting_put(name: str, data: bytes) -> None:
        kind = ("part" if name.startswith("part-") else "record" if name.startswith(fmt.COMMITS_DIR + "/")
                else "manifest" if name == fmt.MANIFEST else "other")
        written[kind] += len(data)
        real_put(name, data)

    w._put = counting_put
    times = np.zeros(n)
    reader_mid = pending_mid = None
    spent = 0.0
    try:
        for k, (unit, index) in enumerate(w.pending(units)):
            if k == tail_from:
                before_tail = dict(written)
            if k == n - 1:  # a reader arrives just before the last commit
                pending_mid = len(w.records)
                t = time.perf_counter()
                ds = TokenDataset(url)
                reader_mid = time.perf_counter() - t
                assert ds.num_rows == (n - 1) * ROWS, (ds.num_rows, n)
            t = time.perf_counter()
            w.commit(unit, index, tables[k % len(tables)], [])
            times[k] = time.perf_counter() - t
            spent += times[k]
            if spent > budget:
                raise OverBudget(f"{k + 1:,} of {n:,} units in {spent:.0f} s")
    except OverBudget:
        w.lease.release()  # leave it uncompacted: nobody reads it
        raise
    bytes_commits = dict(written)
    t = time.perf_counter()
    w.close()
    close_s = time.perf_counter() - t
    t = time.perf_counter()
    ds = TokenDataset(url)
    reader_end = time.perf_counter() - t
    assert ds.num_rows == n * ROWS and len(ds.parts) == n
    proto = lambda b: b["record"] + b["manifest"]  # noqa: E731
    return {
        "ms_tail": times[tail_from:].mean() * 1e3, "ms_all": times.mean() * 1e3, "ms_med": np.median(times) * 1e3,
        "ms_max": times.max() * 1e3, "part_b": bytes_commits["part"] / n, "proto_b": proto(bytes_commits) / n,
        "proto_b_tail": (proto(bytes_commits) - proto(before_tail)) / (n - tail_from),
        "reader_mid": reader_mid, "pending_mid": pending_mid, "reader_end": reader_end, "close_s": close_s,
        "commit_s": times.sum(), "manifest_kib": len(ds.fs.cat_file(f"{ds.root}/{fmt.MANIFEST}")) / 1024,
    }


def compaction_points(n: int, compact_at: int) -> list[int]:
    """After which commits (1-based) TokenWriter.commit compacts, by its rule, in a run of n from empty."""
    points, records = [], 0
    for k in range(1, n + 1):
        records += 1
        if records >= max(compact_at, k - records):
            points.append(k)
            records = 0
    return points


def source_version() -> str:
    """The commit of pipeline/token_writer.py being measured (its protocol is what the table shows)."""
    repo, path = Path(__file__).resolve().parent.parent, "pipeline/token_writer.py"
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%h", "--", path], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=repo).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return f"{path} (version unknown)"
    return f"{path} at {rev}" + (" with uncommitted changes" if dirty else "")


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path (from /proc/mounts)."""
    best, kind = "", "unknown filesystem"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


class Moto:
    """A moto S3 server on 127.0.0.1 (in this process, as tests/conftest.py s3_env runs it)."""

    def __enter__(self):
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3
        import s3fs

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem()
        return self

    def round_trips(self, repeat: int = 30) -> dict:
        """Median ms of one small request (what moto and the client cost per request, nothing stored)."""
        out = {}
        names = [f"bench/_probe/{i}" for i in range(repeat)]
        for op, fn in (("PUT", lambda k: self.fs.pipe_file(k, b"x" * 300)), ("GET", self.fs.cat_file),
                       ("DELETE", self.fs.rm_file)):
            ts = []
            for k in names:
                t = time.perf_counter()
                fn(k)
                ts.append(time.perf_counter() - t)
            out[op] = statistics.median(ts) * 1e3
        return out

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only")
    p.add_argument("--budget", type=float, default=90.0,
                   help="seconds of commits per old-protocol cell before it is skipped")
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    sizes = QUICK if args.quick else SIZES
    stores = args.stores.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    from vqtok.pipeline import token_writer as td

    measured = source_version()  # as imported now
    results, notes, t_run = {}, [], time.perf_counter()
    rt_note = ""

    def cells(store: str, base: str, cleanup):
        for protocol in ("new", "old"):
            over = False
            for n in sizes:
                key = (store, protocol, n)
                if over:
                    results[key] = "skipped (over budget)"
                    print(f"{store} {protocol} N={n:,}: skipped (a smaller N was over budget)", flush=True)
                    continue
                url = f"{base}/{protocol}-{n}"
                try:
                    r = run_cell(url, protocol, n, args.budget if protocol == "old" else float("inf"))
                    results[key] = r
                    print(f"{store} {protocol} N={n:,}: {r['ms_tail']:.2f} ms/unit (last 10%), {r['ms_all']:.2f} "
                          f"(all), max {r['ms_max']:.0f} ms; {r['part_b']:,.0f} + {r['proto_b']:,.0f} B/unit; "
                          f"reader {r['reader_mid'] * 1e3:,.0f} ms mid-run ({r['pending_mid']} records), "
                          f"{r['reader_end'] * 1e3:,.0f} ms after close; close {r['close_s']:.2f} s", flush=True)
                except OverBudget as e:
                    over = True
                    results[key] = "skipped (over budget)"
                    notes.append(f"{store}, {protocol} protocol, N={n:,}: stopped after {e}")
                    print(f"{store} {protocol} N={n:,}: over budget ({e})", flush=True)
                finally:
                    cleanup(url)

    if "local" in stores:
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            cells("local", tmp, lambda url: shutil.rmtree(url, ignore_errors=True))
    if "s3" in stores:
        with Moto() as moto:
            rt = moto.round_trips()
            notes_s3 = ", ".join(f"{op} {ms:.1f} ms" for op, ms in rt.items())
            print(f"moto round trips (300 B, median): {notes_s3}", flush=True)
            rt_note = f" (one 300-byte request, median: {notes_s3})"
            cells("S3 (moto)", "s3://bench",
                  lambda url: moto.fs.rm(url, recursive=True) if moto.fs.exists(url) else None)

    headers = ["store", "protocol", "N units", "ms/unit last 10%", "ms/unit all", "median ms", "max ms",
               "part B/unit", "protocol B/unit last 10%", "protocol B/unit all", "reader mid-run ms (records)",
               "reader after close ms", "close s", "manifest KiB"]
    rows = []
    for (store, protocol, n), r in results.items():
        label = "new (records)" if protocol == "new" else "old (manifest per commit)"
        if isinstance(r, str):
            rows.append([store, label, f"{n:,}", r] + [""] * (len(headers) - 4))
            continue
        rows.append([store, label, f"{n:,}", f"{r['ms_tail']:.2f}", f"{r['ms_all']:.2f}", f"{r['ms_med']:.2f}",
                     f"{r['ms_max']:,.0f}", f"{r['part_b']:,.0f}", f"{r['proto_b_tail']:,.0f}", f"{r['proto_b']:,.0f}",
                     f"{r['reader_mid'] * 1e3:,.0f} ({r['pending_mid']:,})", f"{r['reader_end'] * 1e3:,.0f}",
                     f"{r['close_s']:.2f}", f"{r['manifest_kib']:,.0f}"])
    body = table(headers, rows)
    points = compaction_points(max(sizes), td.COMPACT_AT)
    in_tail = ", ".join(f"{sum(n - max(1, n // 10) < k <= n for k in points)} at N={n:,}" for n in sizes)
    body += (f"\n\n{measured}. Parts of {ROWS} rows (2x2 tokens, zstd Parquet), fake tokenizer metadata; "
             f"TokenWriter driven directly (no Ray). ms/unit: wall time of TokenWriter.commit, mean over the last 10% "
             f"of the units and over all (compactions included); median and max over all. B/unit: bytes passed to TokenWriter._put "
             f"during the commits / N (protocol = commit records + manifest writes; open and close not counted). "
             f"Reader: TokenDataset(OUT) opened just before the last commit (manifest + the uncompacted records, "
             f"their number in brackets) and after close. COMPACT_AT={td.COMPACT_AT}: the new protocol folds the "
             f"records into the manifest when they reach max(COMPACT_AT, entries already folded), i.e. after commits "
             f"{', '.join(f'{k:,}' for k in points)}; compactions among the last 10% of the units: {in_tail}. "
             f"Old protocol = TokenWriter.commit followed by "
             f"compact(): the whole manifest rewritten per commit (plus the O(1) record written and deleted). "
             f"Local: a temp dir under benchmarks/out ({fs_type(OUT)}; staging + fsync + rename per file). S3: moto "
             f"ThreadedMotoServer on 127.0.0.1 in the benchmark's own process{rt_note}. Budget (old protocol only): "
             f"{args.budget:.0f} s of commits per cell; a larger N is not tried once a smaller one was over it.")
    if notes:
        body += "\nOver budget: " + "; ".join(notes) + "."
    body += f"\nWhole run: {time.perf_counter() - t_run:.0f} s."
    print(body)
    if not args.no_append:
        append_results("Commit cost per unit, new vs old protocol (benchmarks/commit_cost.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
