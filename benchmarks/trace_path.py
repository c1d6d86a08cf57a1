"""Which vqtok files and functions one image passes through: tokenize -> train-prior -> sample.

Issue 21 asks that the path bytes -> tokens -> Parquet -> prior -> sampled image pass through clearly
fewer files and calls; this script counts them, before and after, and checks the README's "Reading
order" against what actually runs.

Setup (not traced, in a subprocess so that the traced process imports vqtok's modules itself): two
WebDataset shards from the bundled examples/fashion-mnist (16 images to train a tiny tokenizer for
2 steps with `vqtok.train_vqvae`; ONE image, the first test image, for the traced path), and the
keyword arguments each public config accepts today (so the same script runs after a refactor
renames or nests options; a rejected option is left out and reported).

Traced, in this process, one stage at a time, through the public API only:
  tokenize     vqtok.tokenize(tokenizer, [the one-image shard], tokens/)   (embedded Ray, as a user gets)
  train-prior  vqtok.train_prior(tokens=[tokens/], out=prior/, steps=2, batch_size=1, ...)
               (in this process: workers=1; its default end-of-run samples.png included)
  sample       vqtok.sample(prior=prior/, n=1, ...): one image sampled and decoded by the tokenizer

How: sys.setprofile + threading.setprofile in this process; in every Ray worker process (tokenize's
read tasks and encoder actor) the same profiler, installed at interpreter start by a generated
sitecustomize.py on PYTHONPATH (the embedded Ray's workers inherit this process's environment), which
appends each new (stage, file, function) to a per-process file the moment it is first seen (a worker
may be killed without running atexit). A worker learns the current stage from a file this process
rewrites at each stage. Only code in vqtok's own files counts (the package directory, tests/,
benchmarks/, examples/, docs/ and dot-directories such as .venv/ excluded), by file and qualified
name (pipeline/stages.py:read_units.<locals>.flush). Reported apart from the functions:
  - import-time functions: entered only while a vqtok module was being imported (option(),
    __init_subclass__, decorators); a module's imports fall in the first stage that needs it;
  - anonymous code: <genexpr>, <lambda> (listcomps are inlined from Python 3.12, so not counted);
  - files only imported: module body ran, no function of it entered.
Class bodies are not counted.

    python benchmarks/trace_path.py [--label before] [--record] [--json benchmarks/trace_before.json]
    python benchmarks/trace_path.py --label after --json /tmp/after.json --compare benchmarks/trace_before.json
    python benchmarks/trace_path.py --load /tmp/after.json --compare benchmarks/trace_before.json   (no run)

About 1-2 minutes on 2 cores (Ray start-up included).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository root is the vqtok package directory
STAGES = ("tokenize", "train-prior", "sample")
EXCLUDED_TOP = {"tests", "benchmarks", "examples", "docs", "build", "dist", "runs"}
ANONYMOUS = ("<genexpr>", "<lambda>", "<listcomp>", "<dictcomp>", "<setcomp>")
CO_OPTIMIZED = 0x1  # set on function code; module and class bodies lack it
ENV_DIR, ENV_ROOT = "VQTOK_TRACE_DIR", "VQTOK_TRACE_ROOT"
WORKER_SCRIPT = "default_worker.py"  # how Ray starts its worker processes


# ---------------------------------------------------------------------------------------------
# The profiler (this process and Ray workers)
# ---------------------------------------------------------------------------------------------

class Tracer:
    """A sys.setprofile function recording each new (stage, file, qualname, kind); kind is "call"
    (a function entered at run time), "import" (entered while a vqtok module body was running) or
    "module" (a vqtok module body ran)."""

    def __init__(self, root: str, stage, sink):
        self.root = os.path.realpath(root) + os.sep
        self.stage = stage  # () -> current stage name
        self.sink = sink  # (record tuple) -> None, once per new record
        self.files: dict[str, str | None] = {}  # co_filename -> path relative to root, None: not vqtok
        self.seen: set[tuple] = set()
        self.importing: dict[int, int] = {}  # thread id -> vqtok module bodies running
        self.active = True

    def _rel(self, filename: str) -> str | None:
        if not os.path.isabs(filename):  # <string>, <frozen ...>, torch's generated <_remote_module_...>
            return None
        try:
            p = os.path.realpath(filename)
        except (TypeError, ValueError, OSError):
            return None
        if not p.startswith(self.root) or not p.endswith(".py"):
            return None
        rel = p[len(self.root):]
        top = rel.split(os.sep, 1)[0]
        if top in EXCLUDED_TOP or top.startswith(".") or "site-packages" in rel:
            return None
        return rel.replace(os.sep, "/")

    def __call__(self, frame, event, arg):
        if event != "call" and event != "return":
            return
        code = frame.f_code
        fn = code.co_filename
        rel = self.files.get(fn, 0)
        if rel == 0:
            rel = self.files[fn] = self._rel(fn)
        if rel is None or not self.active:
            return
        name = code.co_qualname
        if name == "<module>":
            tid = threading.get_ident()
            n = self.importing.get(tid, 0) + (1 if event == "call" else -1)
            self.importing[tid] = max(0, n)
            kind = "module"
        elif event != "call" or not code.co_flags & CO_OPTIMIZED:
            return  # a return, or a class body
        else:
            kind = "import" if self.importing.get(threading.get_ident()) else "call"
        if event != "call":
            return
        key = (self.stage(), rel, name, kind)
        if key not in self.seen:
            self.seen.add(key)
            self.sink(key)

    def install(self) -> None:
        sys.setprofile(self)
        threading.setprofile(self)

    def stop(self) -> None:
        self.active = False
        sys.setprofile(None)
        threading.setprofile(None)


class _StageFile:
    """A worker's view of the current stage: the file the driver rewrites, re-read at most every 0.2 s."""

    def __init__(self, path: str):
        self.path, self.t, self.value = path, 0.0, "?"

    def __call__(self) -> str:
        now = time.monotonic()
        if now - self.t > 0.2:
            self.t = now
            try:
                with open(self.path) as f:
                    self.value = f.read().strip() or "?"
            except OSError:
                pass
        return self.value


def install_worker() -> None:
    """Called by the generated sitecustomize.py at every Python start with the trace's environment:
    traces Ray worker processes only (not the driver, not Ray's dashboard and monitors)."""
    trace_dir, root = os.environ.get(ENV_DIR), os.environ.get(ENV_ROOT)
    if not trace_dir or not root or os.path.basename(sys.argv[0] if sys.argv else "") != WORKER_SCRIPT:
        return
    fd = os.open(os.path.join(trace_dir, f"worker-{os.getpid()}.tsv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"")  # the file's existence says this worker was traced

    def sink(key):
        os.write(fd, ("\t".join(key) + "\n").encode())  # unbuffered, one line per write: survives a kill

    Tracer(root, _StageFile(os.path.join(trace_dir, "stage")), sink).install()


SITECUSTOMIZE = f"""# generated by benchmarks/trace_path.py: traces vqtok calls in Ray worker processes
import os, sys
if os.environ.get({ENV_DIR!r}):
    sys.path.insert(0, {str(HERE)!r})
    try:
        import trace_path
        trace_path.install_worker()
    finally:
        sys.path.remove({str(HERE)!r})
"""


# ---------------------------------------------------------------------------------------------
# Setup (a subprocess; not traced)
# ---------------------------------------------------------------------------------------------

def _idx_images(n: int):
    """The first n Fashion-MNIST test images (28x28 uint8) and labels, from the bundled IDX files."""
    import numpy as np

    src = ROOT / "examples" / "fashion-mnist"
    with gzip.open(src / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784)[16:], np.uint8).reshape(n, 28, 28)
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n)[8:], np.uint8)
    return images, [int(x) for x in labels]


def _write_shard(path: Path, images, labels, offset: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, (img, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{offset + i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def _accepted(cls, required: dict, optional: dict, alternatives: list[dict] = ()) -> tuple[dict, list[str]]:
    """The optional keywords cls(**required, ...) accepts, one at a time; then the first of
    `alternatives` (groups of keywords) it accepts. Returns (keywords, what was left out)."""
    out, dropped = {}, []
    for k, v in optional.items():
        try:
            cls(**required, **out, **{k: v})
            out[k] = v
        except Exception as e:  # noqa: BLE001 - any refusal means: leave it out
            dropped.append(f"{k} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    for group in alternatives:
        try:
            cls(**required, **out, **group)
            out |= group
            break
        except Exception as e:  # noqa: BLE001
            dropped.append(f"{sorted(group)} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return out, dropped


def setup(work: Path) -> None:
    import vqtok

    images, labels = _idx_images(17)
    _write_shard(work / "input" / "one-000000.tar", images[:1], labels[:1])
    _write_shard(work / "train" / "train-000000.tar", images[1:], labels[1:], offset=1)
    dropped = []
    tiny = dict(codebook_size=16, image_size=28, channels=1, downsample=4, width=16, res_blocks=1, kmeans_init=False)
    model_kw, d = _accepted(vqtok.VQVAEConfig, {}, tiny)
    dropped += [f"VQVAEConfig {x}" for x in d]
    train_kw, d = _accepted(vqtok.TrainConfig, dict(data=[str(work / "train")], out=str(work / "tok-run")),
                            dict(steps=2, batch_size=8, warmup_steps=0, log_every=1, checkpoint_every=1000,
                                 shuffle_buffer=16, device="cpu", threads=1, seed=0))
    dropped += [f"TrainConfig {x}" for x in d]
    t0 = time.time()
    result = vqtok.train_vqvae(vqtok.TrainConfig(data=[str(work / "train")], out=str(work / "tok-run"),
                                                 model=vqtok.VQVAEConfig(**model_kw), **train_kw))
    tok_dir = str(result.tokenizer_dir)
    # the traced calls' keywords, checked against the public configs here rather than there, so
    # that the traced process imports nothing before its stages
    tok_kw, d = _accepted(vqtok.TokenizeConfig, dict(tokenizer=tok_dir, data=["x"], out="y"),
                          dict(batch_size=1, workers=1, threads_per_worker=1, progress_seconds=600.0))
    dropped += [f"TokenizeConfig {x}" for x in d]
    shape = dict(n_layer=1, n_head=1, n_embd=32)
    prior_kw, d = _accepted(vqtok.PriorTrainConfig, dict(tokens=["x"], out="y"),
                            dict(steps=2, batch_size=1, warmup_steps=0, log_every=1, eval_every=1000,
                                 checkpoint_every=1000, shuffle_buffer=16, device="cpu", threads=1, seed=0),
                            alternatives=[shape, {"model": shape}])
    dropped += [f"PriorTrainConfig {x}" for x in d]
    sample_kw, d = _accepted(vqtok.SampleConfig, dict(prior="x"),
                             dict(n=1, classes=str(labels[0]), device="cpu", seed=0))
    dropped += [f"SampleConfig {x}" for x in d]
    plan = {"tokenizer": tok_dir, "label": labels[0], "setup_seconds": round(time.time() - t0, 1),
            "tokenize": tok_kw, "train_prior": prior_kw, "sample": sample_kw, "dropped": dropped}
    (work / "plan.json").write_text(json.dumps(plan, indent=1))


# ---------------------------------------------------------------------------------------------
# The traced run
# ---------------------------------------------------------------------------------------------

def run_trace(work: Path, keep_ray_logs: bool = False) -> dict:
    if work.exists():
        shutil.rmtree(work)
    (work / "trace").mkdir(parents=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    print(f"setup (not traced): a 2-step tokenizer on 16 Fashion-MNIST images, the one-image shard, in {work}",
          flush=True)
    subprocess.run([sys.executable, __file__, "--_setup", str(work)], check=True, env=env)
    plan = json.loads((work / "plan.json").read_text())
    for d in plan["dropped"]:
        print(f"  left out (the config refuses it): {d}", flush=True)
    print(f"setup: {time.time() - t0:.0f} s", flush=True)

    import vqtok  # __init__.py only: the rest is imported inside the stages

    root = os.path.realpath(os.path.dirname(vqtok.__file__))
    if root != os.path.realpath(ROOT):
        print(f"WARNING: vqtok imports from {root}, not this checkout ({ROOT}): tracing {root}", flush=True)
    trace_dir = work / "trace"
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ[ENV_DIR], os.environ[ENV_ROOT] = str(trace_dir), root
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ.pop("RAY_ADDRESS", None)  # the embedded Ray: its workers inherit this environment

    current = {"stage": "?"}
    records: list[tuple] = []

    def set_stage(name: str) -> None:
        current["stage"] = name
        (trace_dir / "stage").write_text(name)

    tracer = Tracer(root, lambda: current["stage"], records.append)
    shard = str(work / "input" / "one-000000.tar")
    timings = {}
    tracer.install()
    try:
        set_stage("tokenize")
        t = time.time()
        r = vqtok.tokenize(plan["tokenizer"], [shard], str(work / "tokens"), **plan["tokenize"])
        timings["tokenize"] = time.time() - t
        set_stage("train-prior")
        t = time.time()
        p = vqtok.train_prior(tokens=[str(work / "tokens")], out=str(work / "prior"), **plan["train_prior"])
        timings["train-prior"] = time.time() - t
        set_stage("sample")
        t = time.time()
        s = vqtok.sample(prior=str(work / "prior"), out=str(work / "sample.png"), **plan["sample"])
        timings["sample"] = time.time() - t
    finally:
        tracer.stop()
        set_stage("done")
    try:  # the results' fields may change in a refactor: only this line needs them
        images = s.samples.images
        print(f"traced: {r.rows} row(s) tokenized, prior in {p.prior_dir}, sampled {tuple(images.shape)} "
              f"{images.dtype} -> {s.grid}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"traced (results not described: {type(e).__name__}: {e})", flush=True)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass

    workers = sorted(trace_dir.glob("worker-*.tsv"))
    rows = {(stage, f, q, kind, "driver") for stage, f, q, kind in records}
    worker_procs_with_vqtok = 0
    for w in workers:
        lines = [ln.split("\t") for ln in w.read_text().splitlines() if ln.count("\t") == 3]
        worker_procs_with_vqtok += bool(lines)
        rows |= {(stage, f, q, kind, "worker") for stage, f, q, kind in lines}
    return {
        "label": None, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "python": sys.version.split()[0], "root": root,
        "setup": {k: plan[k] for k in ("tokenize", "train_prior", "sample", "dropped", "label")},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "ray_workers": {"traced": len(workers), "entered_vqtok": worker_procs_with_vqtok},
        "records": sorted([list(x) for x in rows]),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# Counting and reporting
# ---------------------------------------------------------------------------------------------

def _anonymous(qualname: str) -> bool:
    return qualname.rsplit(".", 1)[-1] in ANONYMOUS


def summarize(data: dict) -> dict:
    """Per stage and in all: sets of files, functions (run time), import-time functions, anonymous
    code and files only imported; functions as 'file:qualname'."""
    out = {}
    for stage in (*STAGES, "all"):
        recs = [r for r in data["records"] if stage == "all" or r[0] == stage]
        call = {f"{f}:{q}" for _, f, q, k, _ in recs if k == "call" and not _anonymous(q)}
        imp = {f"{f}:{q}" for _, f, q, k, _ in recs if k == "import" and not _anonymous(q)} - call
        anon = {f"{f}:{q}" for _, f, q, k, _ in recs if k in ("call", "import") and _anonymous(q)}
        files = {fq.split(":", 1)[0] for fq in call}
        modules = {f for _, f, q, k, _ in recs if k == "module"}
        worker = {f"{f}:{q}" for _, f, q, k, where in recs if k == "call" and where == "worker" and not _anonymous(q)}
        out[stage] = {"files": files, "functions": call, "import_functions": imp, "anonymous": anon,
                      "imported_only": modules - files - {fq.split(":", 1)[0] for fq in imp},
                      "modules": modules, "worker_functions": worker}
    return out


def readme_reading_order(readme: Path = ROOT / "README.md") -> dict[str, str]:
    """The files the README's "Reading order" section names -> the number of the list item naming
    each first ("3"), or "text" when named outside the numbered list (the commands line)."""
    text = readme.read_text()
    m = re.search(r"^#+ *Reading order.*?$(.*?)(?=^#+ )", text, re.M | re.S)
    named: dict[str, str] = {}
    item = None
    for line in (m.group(1).splitlines() if m else []):
        start = re.match(r"\s*(\d+)\.\s", line)
        if start:
            item = start.group(1)
        elif not line.strip() or not line.startswith(" "):
            item = None  # a blank line or an unindented line ends the item
        for path in re.findall(r"`([\w/]+\.py)", line):
            named.setdefault(path, item or "text")
    return named


def report(data: dict, label: str) -> str:
    from _common import table

    s = summarize(data)
    order = readme_reading_order()
    lines = [f"Traced: one Fashion-MNIST test image (label {data['setup']['label']}) as a one-PNG WebDataset shard, "
             f"through vqtok.tokenize -> vqtok.train_prior (2 steps, batch 1, in process) -> vqtok.sample (1 image, "
             f"decoded by the tokenizer); the tokenizer (2 training steps, vqtok.train_vqvae) is setup, not traced. "
             f"Commit {data['commit']} ({data['branch']}), Python {data['python']}; stage seconds (traced, so "
             f"slower): " + ", ".join(f"{k} {v}" for k, v in data["seconds"].items()) + ". "
             f"Ray worker processes traced: {data['ray_workers']['traced']}, of which "
             f"{data['ray_workers']['entered_vqtok']} entered vqtok code.", ""]
    if not data["ray_workers"]["entered_vqtok"]:
        lines += ["WARNING: no Ray worker process recorded a vqtok call: tokenize's read and encode stages "
                  "were not traced (the counts miss them)", ""]
    if data["setup"]["dropped"]:
        lines += ["Options the public configs refused (left out): " + "; ".join(data["setup"]["dropped"]), ""]
    rows = []
    for stage in (*STAGES, "all"):
        x = s[stage]
        rows.append([stage if stage != "all" else "all stages (union)", len(x["files"]), len(x["functions"]),
                     len(x["worker_functions"]), len(x["import_functions"]), len(x["anonymous"]),
                     len(x["imported_only"])])
    lines += [table([f"{label}: stage", "files", "functions", "of which in Ray workers", "import-time functions",
                     "genexpr/lambda", "files only imported"], rows), ""]
    lines += ["files: vqtok files with at least one function entered at run time; functions: distinct "
              "file:qualname entered at run time (methods and nested functions included; genexpr/lambda, class "
              "bodies and module bodies not); import-time functions: entered only while a vqtok module was "
              "being imported; files only imported: module body ran, nothing in it entered. A module's import "
              "counts in the first stage that needs it. train-prior includes its default end-of-run samples.png "
              "(Prior.sample and Tokenizer.decode); on CPU the nearest-code search never enters "
              "kernels/triton_kernel.py (CUDA only).", ""]
    frows = []
    allf = s["all"]["functions"]
    for f in sorted(s["all"]["files"] | s["all"]["imported_only"]):
        per = [sum(1 for fq in s[st]["functions"] if fq.split(":", 1)[0] == f) for st in STAGES]
        n = sum(1 for fq in allf if fq.split(":", 1)[0] == f)
        frows.append([f, n if f in s["all"]["files"] else "imported only", *per, order.get(f, "")])
    lines += [table(["file", "functions", *STAGES, "README reading order item"], frows), ""]
    traced = s["all"]["files"]
    missing = [f for f in order if f not in traced]
    extra = sorted(traced - set(order))
    lines += [f"README \"Reading order\" ({len(order)} files named: {sum(v != 'text' for v in order.values())} in its "
              f"numbered items, {sum(v == 'text' for v in order.values())} in the text after) vs the trace ({len(traced)} files): "
              f"named but not entered: {', '.join(missing) or 'none'}; entered but not named "
              f"({len(extra)}): {', '.join(extra) or 'none'}."]
    return "\n".join(lines)


def functions_listing(data: dict) -> str:
    s = summarize(data)
    out = []
    for stage in STAGES:
        out.append(f"-- {stage}: {len(s[stage]['functions'])} functions")
        out += [f"   {fq}{'  [worker]' if fq in s[stage]['worker_functions'] else ''}"
                for fq in sorted(s[stage]["functions"])]
    return "\n".join(out)


def compare(before: dict, after: dict) -> str:
    b, a = summarize(before), summarize(after)
    lines = [f"compare: before {before.get('label')} ({before['commit']}) -> after {after.get('label')} ({after['commit']})"]
    for stage in (*STAGES, "all"):
        lines.append(f"  {stage:12s} files {len(b[stage]['files'])} -> {len(a[stage]['files'])}, functions "
                     f"{len(b[stage]['functions'])} -> {len(a[stage]['functions'])}")
    for what in ("files", "functions", "imported_only"):
        added, removed = sorted(a["all"][what] - b["all"][what]), sorted(b["all"][what] - a["all"][what])
        lines.append(f"{what} added ({len(added)}):" + "".join(f"\n  + {x}" for x in added))
        lines.append(f"{what} removed ({len(removed)}):" + "".join(f"\n  - {x}" for x in removed))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="", help="the run's name in the table heading (e.g. before, after)")
    p.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    p.add_argument("--json", metavar="PATH", help="write the raw records (for --compare later)")
    p.add_argument("--compare", metavar="BEFORE_JSON", help="print files and functions added/removed since that run")
    p.add_argument("--load", metavar="JSON", help="report a saved run instead of running")
    p.add_argument("--functions", action="store_true", help="also print every function entered, per stage")
    p.add_argument("--work", default=str(HERE / "out" / "trace_path"), help="scratch directory (emptied first)")
    p.add_argument("--_setup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._setup:
        setup(Path(args._setup))
        return 0
    sys.path.insert(0, str(HERE))
    if args.load:
        data = json.loads(Path(args.load).read_text())
    else:
        data = run_trace(Path(args.work).resolve())
    if args.label or data.get("label") is None:
        data["label"] = args.label or data.get("label") or "this run"
    body = report(data, data["label"])
    print()
    print(body)
    if args.functions:
        print()
        print(functions_listing(data))
    if args.json and not args.load:
        records = ",\n".join(json.dumps(r) for r in data["records"])  # one line each: diffable
        Path(args.json).write_text(json.dumps(data | {"records": "@"}, indent=1).replace('"@"', f"[\n{records}\n]") + "\n")
        print(f"wrote {args.json}")
    if args.compare:
        print()
        print(compare(json.loads(Path(args.compare).read_text()), data))
    if args.record:
        from _common import append_results

        append_results(f"Path trace, {data['label']}: one image through tokenize -> train-prior -> sample "
                       f"(benchmarks/trace_path.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
