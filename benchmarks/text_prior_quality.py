"""Text priors measured: prompt fidelity, attributes, caption information and captioning, beside a
class-conditional prior trained on the same tokens.

Stages (each writes under --out, benchmarks/out/text_prior/SETTING/, and is skipped when its output is
there, so a killed run resumes by re-running the same command; `--only a,b` runs just those; the
training stages resume from their last checkpoint):

  tokenizer   a Fashion-MNIST VQ-VAE (vqtok.train_vqvae, the package defaults: K=512, 7x7 grid) on the
              60k train split, --tok-steps steps (the budget). Skipped with --tokenizer DIR.
  tokens      Fashion-MNIST 60k train + 10k test with their captions (examples/make_fashion_mnist_captions.py,
              written beside copies of the IDX files), and the openclipart drawings at 28 px with their
              titles (benchmarks/out/captions, made by benchmarks/captions.py: its last --clip-val-shards
              shards held out), all through vqtok.tokenize(workers=1) with the same tokenizer.
  text-tokenizer  with --text-tokenizer bpe:N, a byte-level BPE of up to N ids fitted on the train
              tokens' captions (vqtok.train_text_tokenizer; with N >= 512 every caption word is one id);
              with "bytes" nothing to do.
  prior-text  a text prior on the Fashion-MNIST train tokens: that text tokenizer, order "both",
              max_text_tokens --max-text-tokens, caption_dropout 0.1; held out on the test tokens.
  prior-class a class-conditional prior on the SAME tokens, the same shape, steps, batch and lr.
  prior-clip  a text prior on the openclipart train shards (held out on the others), --clip-steps.
  fidelity    ten prompts, one per garment (half of them with HELD_OUT_PHRASES, wordings no caption
              uses), --n samples each at every --cfg-scales, decoded and judged by the Fashion-MNIST
              classifier (benchmarks/fmnist_classifier.py, 91.9% test accuracy); the class prior with
              the class id at the same scales and seed.
  attributes  for each garment, --n samples of "a dark X" and of "a light X" at --attr-cfg; the mean
              garment brightness (the captioner's pixel measure) of each.
  captioning  greedy captions (TextPrior.captions) of the test images' tokens (--caption-rows of the
              10k, in dataset order): garment_of(caption) == true class; and, where the caption says
              "dark" or "light", whether the image's brightness class (the captioner's tertiles) agrees.
  cost        training cost side by side: the two trained Fashion-MNIST priors (same shape), a training
              step each (forward, backward, AdamW) on the same 64 train rows, in turns, --cost-rounds
              rounds of 10 steps after a warm-up; image tokens/s (h*w per row) and all positions/s. The
              sampling rates come from the fidelity stage (the two priors sampled in turns per scale).
  report      the table, appended to benchmarks/RESULTS.md (always re-run; --no-append to print only).

Held-out bits per image token with the caption and with the empty caption come from each text prior's
metrics.json ("text"). Targets (issue 23): prompt fidelity >= 85% at the best cfg scale; dark < light
for every garment; the caption carries information (bits with < bits without) on both datasets;
captions name the right garment >= 80%. Reported PASS/FAIL as measured.

Settings (--setting; steps are the time budget of the training stages):
  quick   tokenizer 1,000 steps of batch 128 (or --tokenizer an existing Fashion-MNIST bundle), text as
          bytes, priors 2 layers x 128 for 500 steps of batch 64 (the openclipart prior 150), 20 samples
          per prompt and scale, 2,000 test images captioned: about 35-60 min.
  medium  text as a BPE fitted on the train captions (bpe:1024: every caption word one id, captions
          at most 10 ids instead of 51 bytes), priors 4 x 256 for 3,000 steps (the openclipart
          prior 1,000), 100 samples per prompt and scale, all 10k captioned: about 70 min on an idle
          2-core machine (25 min the text prior, 20 the class prior).
  full    tokenizer 5,000 steps, the medium setting's text and priors for 6,000 steps (as
          benchmarks/prior_quality.py; the openclipart prior 3,000): about 2.5 hours.
Run the stages one after another: three training processes at once on 2 cores (2 threads each) ran
5-10x slower than one. Any value can be overridden (--steps, --n-layer, --text-tokenizer, ...).

    python benchmarks/text_prior_quality.py --setting quick [--only tokens,prior-text] [--no-append]
    python benchmarks/text_prior_quality.py --setting medium --tokenizer DIR   # reuse a tokenizer
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "examples"))
from _common import append_results, ensure_fashion_mnist, table  # noqa: E402
from fmnist_classifier import classify, ensure_classifier  # noqa: E402
import make_fashion_mnist_captions as fm  # noqa: E402

import vqtok  # noqa: E402
from vqtok import Prior, TokenDataset  # noqa: E402

STAGES = ("tokenizer", "tokens", "text-tokenizer", "prior-text", "prior-class", "prior-clip", "fidelity", "attributes", "captioning",
          "cost", "report")
CLIP_TEXT_BYTES = 56  # the openclipart prior's captions (titles as bytes) are cut to this many
CLIP_SHARDS = REPO / "benchmarks" / "out" / "captions" / "openclipart-all-28px-500" / "shards"
# One prompt per garment: held-out phrasings (no caption uses them) for five, caption phrasings in
# caption templates for the other five.
PROMPTS = {
    0: ("tee top", None, "{}"),                 # held out
    1: ("trousers", None, "a photo of {}"),
    2: ("pullover sweater", None, "{}"),        # held out
    3: ("dress", None, "a picture of {}"),
    4: ("outdoor jacket", None, "{}"),          # held out
    5: ("sandal", None, "{}"),
    6: ("casual blouse", None, "{}"),           # held out
    7: ("sneaker", None, "a product shot of {}"),
    8: ("hand bag", None, "{}"),                # held out
    9: ("ankle boot", None, "{}"),
}
HELD_OUT = {c for c, (p, _, _) in PROMPTS.items() if p in fm.HELD_OUT_PHRASES[c]}


def garment_prompts() -> list[str]:
    return [fm.prompt(p, a, t) for c, (p, a, t) in sorted(PROMPTS.items())]


SETTINGS = {  # --setting: the defaults of the values left unset on the command line
    "quick": dict(tok_steps=1000, steps=500, clip_steps=150, n_layer=2, n_embd=128, n=20, caption_rows=2000,
                  text_tokenizer="bytes"),
    "medium": dict(tok_steps=1000, steps=3000, clip_steps=1000, n_layer=4, n_embd=256, n=100, caption_rows=10_000,
                   text_tokenizer="bpe:1024"),
    "full": dict(tok_steps=5000, steps=6000, clip_steps=3000, n_layer=4, n_embd=256, n=100, caption_rows=10_000,
                 text_tokenizer="bpe:1024"),
}


def settings(a) -> dict:
    if a.quick:
        a.setting = "quick"
    d = SETTINGS[a.setting]
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.max_text_tokens is None:
        a.max_text_tokens = 56 if a.text_tokenizer == "bytes" else 16
    return d


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# --- stages --------------------------------------------------------------------------------------
def stage_tokenizer(a, out: Path) -> dict:
    data = ensure_fashion_mnist()
    run = out / "tokenizer-run"
    t0 = time.time()
    res = vqtok.train_vqvae(vqtok.TrainConfig(
        data=[str(data / "train-images-idx3-ubyte.gz")], val_data=[str(data / "t10k-images-idx3-ubyte.gz")],
        out=str(run), steps=a.tok_steps, batch_size=128, threads=2, log_every=max(1, a.tok_steps // 10),
        checkpoint_every=max(1, a.tok_steps // 4)))
    return {"tokenizer": str(run / "tokenizer"), "held_out": res.metrics.get("held_out"), "seconds": time.time() - t0,
            "steps": a.tok_steps}


def given_tokenizer(path: str) -> dict:
    """A tokenizer passed with --tokenizer, with what its training run recorded when that sits beside
    it (train-config.json / train-metrics.json copied from the run, or the run directory above it)."""
    d = Path(path)
    info = {"tokenizer": str(d), "given": True}
    for name, key in (("config", "train-config.json"), ("metrics", "train-metrics.json")):
        for f in (d / key, d.parent / f"{name}.json"):
            if f.is_file():
                info[name] = json.loads(f.read_text())
                break
    cfg, m = info.get("config", {}), info.get("metrics", {})
    info["steps"] = cfg.get("steps", "?")
    info["data"] = cfg.get("data")
    info["held_out"] = m.get("held_out") or m.get("train_eval")
    return info


def stage_tokens(a, out: Path, tokenizer: str) -> dict:
    src = ensure_fashion_mnist()
    info = {}
    t0 = time.time()
    for split in ("train", "t10k"):
        d = out / f"fmnist-{split}"
        if not (d / f"{split}-captions.txt").is_file():
            fm.main(["--split", split, "--source", str(src), "--out", str(d), "--copy-images"])
        vqtok.tokenize(tokenizer, str(d / f"{split}-images-idx3-ubyte.gz"), str(out / f"tokens-{split}"), workers=1)
        info[split] = TokenDataset(str(out / f"tokens-{split}")).num_rows
    shards = sorted(CLIP_SHARDS.glob("*.tar"))
    if not shards:
        raise SystemExit(f"no openclipart shards in {CLIP_SHARDS}: run `python benchmarks/captions.py --only corpus` first")
    cut = len(shards) - a.clip_val_shards
    for name, part in (("clip-train", shards[:cut]), ("clip-val", shards[cut:])):
        vqtok.tokenize(tokenizer, [str(s) for s in part], str(out / f"tokens-{name}"), workers=1)
        ds = TokenDataset(str(out / f"tokens-{name}"))
        info[name] = ds.num_rows
        info[name + "-captions"] = ds.caption_counts()
    info["seconds"] = time.time() - t0
    return info


def stage_text_tokenizer(a, out: Path) -> dict:
    if a.text_tokenizer == "bytes":
        return {"text_tokenizer": "bytes", "vocab_size": 256}
    m = re.fullmatch(r"bpe:(\d+)", a.text_tokenizer)
    if not m:
        raise SystemExit(f"--text-tokenizer {a.text_tokenizer!r}: \"bytes\" or \"bpe:N\" (e.g. bpe:1024)")
    r = vqtok.train_text_tokenizer(str(out / "tokens-train"), vocab_size=int(m.group(1)), out=str(out / "text-bpe" / "tokenizer.json"))
    if r.not_round_trip:
        raise SystemExit(f"the BPE does not round-trip {r.not_round_trip} captions: {r.bad_examples}")
    return {"text_tokenizer": r.out, "vocab_size": r.vocab_size, "asked": a.text_tokenizer, "id": r.id}


def stage_prior(a, out: Path, name: str, text_tokenizer: str) -> dict:
    text = name != "prior-class"
    clip = name == "prior-clip"
    tokens = [str(out / ("tokens-clip-train" if clip else "tokens-train"))]
    val = [str(out / ("tokens-clip-val" if clip else "tokens-t10k"))]
    steps = a.clip_steps if clip else a.steps
    opts = dict(tokens=tokens, val_tokens=val, out=str(out / name), steps=steps, batch_size=a.batch_size,
                n_layer=a.n_layer, n_head=4, n_embd=a.n_embd, dropout=0.1, lr=a.lr, eval_every=steps,
                log_every=max(1, steps // 30), checkpoint_every=max(1, steps // 5), threads=2)
    if text:
        # the openclipart prior reads its titles as bytes: a BPE fitted on garment captions does not fit them
        # (and up to CLIP_TEXT_BYTES of them: titles are longer than garment captions)
        opts |= dict(text_tokenizer="bytes" if clip else text_tokenizer, order="both",
                     max_text_tokens=CLIP_TEXT_BYTES if clip else a.max_text_tokens, caption_dropout=0.1)
    t0 = time.time()
    res = vqtok.train_prior(**opts)
    m = res.metrics
    return {"prior_dir": res.prior_dir, "seconds_this_call": time.time() - t0, "steps": steps,
            "held_out_bits": m["held_out"]["bits_per_token"], "unigram": m.get("unigram_entropy_bits"),
            "tokens_per_s": m.get("tokens_per_s"), "text": m.get("text")}


def _judge(images) -> np.ndarray:
    return classify(ensure_classifier(), np.asarray(images))


def stage_fidelity(a, out: Path, done: dict) -> dict:
    text = Prior.load(done["prior-text"]["prior_dir"])
    cls = Prior.load(done["prior-class"]["prior_dir"])
    prompts = garment_prompts()
    want = np.repeat(np.arange(10), a.n)
    res = {"prompts": prompts, "held_out": sorted(HELD_OUT), "n": a.n, "scales": {}}
    for s in a.cfg_scales:
        t0 = time.time()
        st = text.sample(prompts, n=a.n, cfg_scale=s, seed=1, batch_size=250)
        t_text = time.time() - t0
        t0 = time.time()
        sc = cls.sample(10 * a.n, classes=want, cfg_scale=s, seed=1, batch_size=250)
        t_cls = time.time() - t0
        pt, pc = _judge(st.images.numpy()), _judge(sc.images.numpy())
        res["scales"][str(s)] = {
            "text": float((pt == want).mean()), "class": float((pc == want).mean()),
            "text_per_class": [float((pt[want == c] == c).mean()) for c in range(10)],
            "class_per_class": [float((pc[want == c] == c).mean()) for c in range(10)],
            "text_confusion": [np.bincount(pt[want == c], minlength=10).tolist() for c in range(10)],
            "text_img_per_s": len(want) / t_text, "class_img_per_s": len(want) / t_cls}
        print(f"fidelity cfg {s:g}: text {res['scales'][str(s)]['text']:.3f}, class {res['scales'][str(s)]['class']:.3f}",
              flush=True)
        if s == max(a.cfg_scales):
            from vqtok.pipeline.viz import save_prompt_grid
            first = np.concatenate([np.flatnonzero(want == c)[:10] for c in range(10)])
            res["grid"] = save_prompt_grid(st.images.numpy()[first], [st.prompts[i] for i in first],
                                           out / f"prompts_cfg{s:g}.png")
    return res


def stage_attributes(a, out: Path, done: dict) -> dict:
    text = Prior.load(done["prior-text"]["prior_dir"])
    rows = []
    for c in range(10):
        phrase = fm.GARMENT_PHRASES[c][0]
        ps = [fm.prompt(phrase, fm.DARK), fm.prompt(phrase, fm.LIGHT)]
        s = text.sample(ps, n=a.n, cfg_scale=a.attr_cfg, seed=2, batch_size=250)
        b = fm.garment_brightness(s.images.numpy())
        pred = _judge(s.images.numpy())
        rows.append({"class": c, "dark_prompt": ps[0], "light_prompt": ps[1], "dark": float(b[:a.n].mean()),
                     "light": float(b[a.n:].mean()), "garment_acc": float((pred == c).mean()),
                     "dark_class_share": float(np.mean([fm.brightness_class(x, c) == fm.DARK for x in b[:a.n]])),
                     "light_class_share": float(np.mean([fm.brightness_class(x, c) == fm.LIGHT for x in b[a.n:]]))})
        print(f"attributes {fm.CLASS_NAMES[c]}: dark {rows[-1]['dark']:.1f} light {rows[-1]['light']:.1f}", flush=True)
    return {"cfg": a.attr_cfg, "n": a.n, "rows": rows}


def _index(key: str) -> int:
    return int(re.findall(r"\d+", key)[-1])


def stage_captioning(a, out: Path, done: dict) -> dict:
    text = Prior.load(done["prior-text"]["prior_dir"])
    ds = TokenDataset(str(out / "tokens-t10k"))
    t = ds.to_table(["key", "tokens", "label", "caption"])
    grids, labels = ds.grids(t), np.asarray(t.column("label").to_pylist())
    idx = np.array([_index(k) for k in t.column("key").to_pylist()])
    order = np.argsort(idx)[: a.caption_rows]
    images, _ = fm.read_split(out / "fmnist-t10k", "t10k")
    b = fm.garment_brightness(images[idx[order]])
    t0 = time.time()
    caps = text.captions(grids[order].astype(np.int64), greedy=True, batch_size=250)
    secs = time.time() - t0
    lab = labels[order]
    named = [fm.garment_of(c) for c in caps]
    right = np.array([n == y for n, y in zip(named, lab)])
    said, agree, said_true = 0, 0, 0
    for c, y, x in zip(caps, lab, b):
        words = set(re.findall(r"[a-z]+", c.lower()))
        claim = fm.DARK if fm.DARK in words else fm.LIGHT if fm.LIGHT in words else None
        truth = fm.brightness_class(x, y)
        said_true += truth is not None
        if claim is not None:
            said += 1
            agree += claim == truth
    per_class = [float(right[lab == c].mean()) for c in range(10)]
    examples = [{"caption": caps[i], "true": fm.CLASS_NAMES[lab[i]], "source_caption": t.column("caption")[int(order[i])].as_py()}
                for i in range(12)]
    return {"rows": int(len(order)), "garment_right": float(right.mean()), "no_garment": float(np.mean([n is None for n in named])),
            "per_class": per_class, "brightness_said": said, "brightness_agree": agree,
            "brightness_true_rows": said_true, "seconds": secs, "examples": examples,
            "distinct": len(set(caps))}


def stage_cost(a, out: Path, done: dict) -> dict:
    ds = TokenDataset(str(out / "tokens-train"))
    t = ds.to_table(["tokens", "label", "caption"]).slice(0, a.batch_size)
    grids = torch.as_tensor(ds.grids(t).astype(np.int64))
    labels = torch.as_tensor(np.asarray(t.column("label").to_pylist()))
    models = {"text": Prior.load(done["prior-text"]["prior_dir"]), "class": Prior.load(done["prior-class"]["prior_dir"])}
    text_ids = models["text"].encode_text(t.column("caption").to_pylist())
    orders = [("text-first", "image-first")[i % 2] for i in range(len(text_ids))]  # half each, one per row
    steps = {"text": lambda m: m.loss(text_ids, grids, orders), "class": lambda m: m.loss(grids, labels)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    secs = {k: 0.0 for k in models}
    for k, m in models.items():
        m.train()
    for r in range(a.cost_rounds + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(10):
                loss = steps[k](m)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            if r:  # round 0 warms up
                secs[k] += time.perf_counter() - t0
    rows, per_row = a.cost_rounds * 10 * a.batch_size, grids[0].numel()
    seq_len = {"text": models["text"].cfg.seq_len, "class": models["class"].cfg.prefix_len + per_row}
    res = {k: {"image_tokens_per_s": rows * per_row / secs[k], "steps_per_s": a.cost_rounds * 10 / secs[k],
               "seq_len": seq_len[k], "positions_per_s": rows * seq_len[k] / secs[k]} for k in models}
    for k in models:
        print(f"cost {k}: {res[k]['image_tokens_per_s']:,.0f} image tokens/s", flush=True)
    return res


def _rel(path: str | None) -> str | None:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (TypeError, ValueError):
        return path


# --- report --------------------------------------------------------------------------------------
def report(a, out: Path, done: dict) -> tuple[str, bool]:
    f, at, cap = done.get("fidelity"), done.get("attributes"), done.get("captioning")
    pt, pc, pk = done.get("prior-text"), done.get("prior-class"), done.get("prior-clip")
    rows, bars = [], []
    if f:
        best = max(f["scales"], key=lambda s: f["scales"][s]["text"])
        for s, r in f["scales"].items():
            ho = np.mean([r["text_per_class"][c] for c in f["held_out"]])
            seen = np.mean([r["text_per_class"][c] for c in range(10) if c not in f["held_out"]])
            rows.append([f"prompt fidelity, cfg {float(s):g}" + (" (best)" if s == best else ""),
                         f"{r['text']:.3f} (held-out wordings {ho:.3f}, caption wordings {seen:.3f})",
                         f"{r['class']:.3f} (class id)"])
        bars.append(("prompt fidelity >= 85% at the best cfg scale", f["scales"][best]["text"] >= 0.85))
    if at:
        ok = sum(r["dark"] < r["light"] for r in at["rows"])
        rows.append([f"attributes: dark < light (mean garment brightness, cfg {at['cfg']:g})", f"{ok} of 10", "-"])
        bars.append(("dark < light for every garment", ok == 10))
    for name, p, what in (("Fashion-MNIST", pt, "test 10k"), ("openclipart", pk, "held-out shards")):
        if p and p.get("text"):
            w, e = p["held_out_bits"], p["text"]["bits_per_image_token_empty_caption"]
            rows.append([f"{name}: held-out bits/image token, caption / empty caption ({what})",
                         f"{w:.4f} / {e:.4f} (diff {e - w:.4f}; {p['text']['caption_bits_per_image']:.1f} bits/image)",
                         f"{pc['held_out_bits']:.4f} (class id)" if name == "Fashion-MNIST" and pc else "-"])
            bars.append((f"{name}: the caption carries information", e - w > 0))
    if cap:
        rows.append([f"captioning: names the right garment ({cap['rows']:,} test images, greedy)",
                     f"{cap['garment_right']:.3f} (no garment named: {cap['no_garment']:.3f})", "-"])
        rows.append(["captioning: dark/light said agrees with the pixels",
                     f"{cap['brightness_agree']}/{cap['brightness_said']} = "
                     f"{cap['brightness_agree'] / max(cap['brightness_said'], 1):.3f} (said on "
                     f"{cap['brightness_said'] / cap['rows']:.3f} of images; true class exists for "
                     f"{cap['brightness_true_rows'] / cap['rows']:.3f})", "-"])
        bars.append(("captions name the right garment >= 80%", cap["garment_right"] >= 0.80))
    cost = done.get("cost")
    if cost:
        ct, cc = cost["text"], cost["class"]
        rows.append([f"training image tokens/s (cost stage: {a.batch_size} rows, in turns)",
                     f"{ct['image_tokens_per_s']:,.0f} ({ct['seq_len']} ids a row; "
                     f"{ct['image_tokens_per_s'] / cc['image_tokens_per_s']:.2f}x the class prior's)",
                     f"{cc['image_tokens_per_s']:,.0f} ({cc['seq_len']} ids a row)"])
    elif pt and pc:
        rows.append(["training tokens/s at the end of training (separate runs: noisy)", f"{pt['tokens_per_s']:,.0f}",
                     f"{pc['tokens_per_s']:,.0f}"])
    if f:
        r = f["scales"][best]
        rows.append([f"sampling images/s at cfg {float(best):g}, decoded (the two in turns)", f"{r['text_img_per_s']:.1f} "
                     f"({r['text_img_per_s'] / r['class_img_per_s']:.2f}x)", f"{r['class_img_per_s']:.1f}"])
    tt = done.get("text-tokenizer", {"text_tokenizer": "bytes", "vocab_size": 256})
    tname = "bytes" if tt["text_tokenizer"] == "bytes" else f"BPE, {tt['vocab_size']} ids"
    body = table(["measure", f"text prior ({tname}, order both)", "class prior, same tokens and shape"], rows)
    tk = done.get("tokenizer", {})
    tok = done.get("tokens", {})
    mse = (tk.get("held_out") or {}).get("mse", float("nan"))
    if tk.get("given"):
        what = (f"given ({tk['tokenizer']}): K=512, 7x7, {tk.get('steps', '?')} steps of batch "
                f"{(tk.get('config') or {}).get('batch_size', '?')} on {tk.get('data')}, MSE {mse:.4f} on its own "
                f"training images{'; ' + a.tokenizer_note if a.tokenizer_note else ''}")
    else:
        what = (f"vqtok.train_vqvae defaults (K=512, 7x7) on the 60k train split, {tk.get('steps', '?')} steps of "
                f"batch 128 (test MSE {mse:.4f})")
    body += (f"\n\nSetting: {a.setting}. Tokenizer: {what}. Priors: {a.n_layer} layers x {a.n_embd}, 4 heads, "
             f"dropout 0.1, batch {a.batch_size}, lr {a.lr}, {a.steps} steps each on the same {tok.get('train', 0):,} "
             f"train grids (text: {tname}{' fitted on the train captions' if tname != 'bytes' else ''}, order both, max {a.max_text_tokens} text ids, caption dropout 0.1); the "
             f"openclipart text prior the same shape, {a.clip_steps} steps on {tok.get('clip-train', 0):,} drawings at 28 px "
             f"(held out: the last {a.clip_val_shards} shards, {tok.get('clip-val', 0):,} drawings), tokenized with the "
             f"Fashion-MNIST tokenizer (its text as bytes, at most {CLIP_TEXT_BYTES} of them). One process, 2 threads; load average (1 min) at the start of "
             f"each stage: " + ", ".join(f"{s} {done[s]['load_at_start']:.1f}" for s in done if "load_at_start" in done[s])
             + " (above 2, the cores were shared and seconds and rates are noisy; the quality figures are not).\n")
    if f:
        per = f["scales"][best]
        body += (f"\nPrompts ({f['n']} samples each, seed 1; * = a wording no caption uses), per-garment accuracy at cfg "
                 f"{float(best):g}, text / class: "
                 + "; ".join(f"\"{p}\"{'*' if c in f['held_out'] else ''} {per['text_per_class'][c]:.2f} / "
                             f"{per['class_per_class'][c]:.2f}" for c, p in enumerate(f["prompts"]))
                 + f". Judge: benchmarks/fmnist_classifier.py (91.9% on the real test split). Grid: {_rel(f.get('grid'))}\n")
    if at:
        body += (f"\nAttributes (\"a dark X\" vs \"a light X\", {at['n']} samples each, mean garment brightness 0-255, "
                 f"dark/light): " + "; ".join(f"{fm.CLASS_NAMES[r['class']]} {r['dark']:.0f}/{r['light']:.0f}"
                                              for r in at["rows"]) + "\n")
    if cap:
        body += ("\nCaptioning per garment: " + ", ".join(f"{fm.CLASS_NAMES[c]} {v:.2f}" for c, v in enumerate(cap["per_class"]))
                 + f"; {cap['distinct']} distinct captions; {cap['seconds']:.0f}s for {cap['rows']:,}. E.g. "
                 + "; ".join(f"\"{e['caption']}\" ({e['true']})" for e in cap["examples"][:4]) + "\n")
    body += "\nTargets: " + "; ".join(f"{b} {'PASS' if ok else 'FAIL'}" for b, ok in bars)
    missing = [s for s in STAGES[:-1] if s not in done]
    if missing:
        body += f"\nStages not run: {', '.join(missing)}."
    return body, all(ok for _, ok in bars)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="full", help="the budget (module docstring); each "
                   "setting has its own output folder")
    p.add_argument("--quick", action="store_true", help="the same as --setting quick")
    p.add_argument("--only", default="", help=f"comma-separated stages: {', '.join(STAGES)}")
    p.add_argument("--out", default=None, help="default benchmarks/out/text_prior[/quick]")
    p.add_argument("--tokenizer", default="", help="use this tokenizer bundle instead of training one")
    p.add_argument("--tokenizer-note", default="", help="what to say about a --tokenizer in the table's notes")
    p.add_argument("--tok-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps of both Fashion-MNIST priors")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="text ids per caption (default: 56 for bytes, 16 for a BPE; captions are at most 51 bytes)")
    p.add_argument("--text-tokenizer", default=None,
                   help="the Fashion-MNIST text prior's text tokenizer: bytes, or bpe:N (fitted in its own stage)")
    p.add_argument("--clip-val-shards", type=int, default=2)
    p.add_argument("--n", type=int, default=None, help="samples per prompt and scale")
    p.add_argument("--cfg-scales", default="1,2,3,5")
    p.add_argument("--attr-cfg", type=float, default=3.0, help="cfg scale of the attribute prompts (fixed beforehand)")
    p.add_argument("--caption-rows", type=int, default=None)
    p.add_argument("--cost-rounds", type=int, default=3, help="rounds of 10 training steps per prior in the cost stage")
    p.add_argument("--note", default="", help="a sentence added to the table's notes (e.g. how the stages ran)")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args()
    settings(a)
    a.cfg_scales = [float(s) for s in a.cfg_scales.split(",")]
    torch.set_num_threads(2)
    out = Path(a.out or REPO / "benchmarks" / "out" / "text_prior" / a.setting)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in a.only.split(",") if s] or list(STAGES)
    bad = [s for s in only if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}: {', '.join(STAGES)}")
    done = {}
    t_all = time.time()
    for stage in STAGES[:-1]:
        path = out / f"{stage}.json"
        if path.is_file():
            done[stage] = json.loads(path.read_text())
            continue
        if stage == "tokenizer" and a.tokenizer:
            done[stage] = given_tokenizer(a.tokenizer)
            save_json(path, done[stage])
            continue
        if stage not in only:
            continue
        print(f"=== stage {stage}", flush=True)
        t0, load = time.time(), os.getloadavg()[0]
        if stage == "tokenizer":
            r = stage_tokenizer(a, out)
        elif stage == "tokens":
            r = stage_tokens(a, out, done["tokenizer"]["tokenizer"])
        elif stage.startswith("prior-"):
            r = stage_prior(a, out, stage, done.get("text-tokenizer", {}).get("text_tokenizer", "bytes"))
        elif stage == "text-tokenizer":
            r = stage_text_tokenizer(a, out)
        else:
            r = {"fidelity": stage_fidelity, "attributes": stage_attributes, "captioning": stage_captioning,
                 "cost": stage_cost}[stage](a, out, done)
        r["stage_seconds"], r["load_at_start"] = time.time() - t0, load
        save_json(path, r)
        done[stage] = r
        print(f"=== stage {stage} done in {r['stage_seconds']:.0f}s", flush=True)
    if "report" in only:
        body, ok = report(a, out, done)
        secs = {s: round(done[s]["stage_seconds"]) for s in done if "stage_seconds" in done[s]}
        body += "\nStage seconds (first run of each): " + ", ".join(f"{s} {v}" for s, v in secs.items()) + "."
        if a.note:
            body += "\n" + a.note
        print(body)
        if not a.no_append:
            append_results(f"Text prior quality, {a.setting} setting (benchmarks/text_prior_quality.py)", body)
        print(f"this call: {time.time() - t_all:.0f}s")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
