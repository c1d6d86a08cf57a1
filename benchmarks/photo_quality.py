"""Tokenizer quality on real colour photographs: conv vs vqgan vs an outside quantizer, side by side.

64x64 crops of the photographs in Debian's desktop-background packages (mate-backgrounds,
plasma-workspace-wallpapers, ukui-wallpapers, lomiri-wallpapers-16.04/-20.04; installed if missing),
K=1024 codes, 8x8 tokens (downsample 8), 8-dimensional l2-normalised codes behind 1x1 projections
from 64 encoder channels, for all three:

  (a) vqtok conv:  VQVAEConfig(arch="conv", downsample=8), its default widths (80 channels at the
                   grid, 2 residual blocks), trained by the real job (vqtok.train_vqvae);
  (b) vqtok vqgan: VQVAEConfig(arch="vqgan", width=32, channel_mult=[1,2,2,4], res_blocks=1): the
                   ResNet+GroupNorm+attention network at reduced width, trained by the real job;
  (c) peer:        the same vqgan encoder/decoder (vqtok.models.vqgan.VQGANEncoder/VQGANDecoder, same
                   widths, same 1x1 projections 64 -> 8 -> 64, built in the same order from the same
                   seed, so its starting weights are (b)'s) around lucidrains' vector-quantize-pytorch
                   VectorQuantize: EMA codebook (decay 0.99, eps 1e-5, as ours), kmeans_init (10
                   iterations, on its first batch, as the library does), use_cosine_sim (l2-normalised
                   inputs and codes, as our l2_normalize), threshold_ema_dead_code for dead-code
                   restarts, commitment weight 0.25 (our beta), plain straight-through gradients
                   (rotation_trick=False, as ours; the library's default is the rotation trick).
                   Trained by a loop in this script that repeats the job's step exactly: the same
                   batches (an ImageStream with the job's seed and shuffle buffer, prefetched the same
                   way), AdamW(betas 0.9, 0.99) at the job's lr, warmup and cosine schedule, gradient
                   clip 1.0, loss = MSE(recon, x) + the quantizer's loss, the same torch threads.

The data are split BY PHOTOGRAPH: one file per picture (plasma's contents/images/WxH.jpg sizes, mate's
Name_WxH.jpg and a picture's light/dark variants are one picture, its largest file kept); every colour
JPEG of >= 1 Mpx (the PNG and WebP wallpapers there are rendered graphics, not photographs); a fixed
fifth of the pictures (by sha1 of the picture's name) is held out whole. Each picture is downscaled
(bicubic) to shorter side 256 and 512, and random 64x64 crops are cut at both scales (--train-crops and
--held-out-crops per picture per scale). The crops are shuffled and written as WebDataset shards that
the job reads; the held-out crops as well (the job's own held-out metrics are kept as a cross-check).

Held-out metrics, computed here for all three the same way: PSNR (pixels in [0, 1], MSE over all
pixels), SSIM (gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, per channel, valid positions only,
mean over images), codebook usage (codes used at least once) and perplexity of the code histogram over
all held-out crops; training seconds (the training loop only); parameters (trainable, codebook
excluded). The picture: held-out originals and the three reconstructions in rows.

    python benchmarks/photo_quality.py [--steps 400] [--warmup 40] [--batch-size 32] [--lr 2e-3] [--threads 2]
                                       [--train-crops 100] [--held-out-crops 16] [--dead-threshold 0.1]
                                       [--out benchmarks/out/photo_quality] [--no-append]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

from vqtok import Tokenizer, TrainConfig, VQVAEConfig, train_vqvae  # noqa: E402
from vqtok.jobs.trainer import cosine_lr, prefetch  # noqa: E402
from vqtok.models.tokenizer import Preprocess  # noqa: E402
from vqtok.models.vqgan import VQGANDecoder, VQGANEncoder  # noqa: E402
from vqtok.models.vqvae import perplexity  # noqa: E402
from vqtok.pipeline.sharded_stream import ImageStream  # noqa: E402
from vqtok.pipeline.sources import FailureLog, list_units  # noqa: E402

PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "ukui-wallpapers", "lomiri-wallpapers-16.04",
            "lomiri-wallpapers-20.04")
ROOTS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
MIN_PIXELS = 1_000_000
SIZE, K, CODE_DIM, Z_CHANNELS = 64, 1024, 8, 64
SCALES = (256, 512)
SHARD = 5000

COMMON = dict(image_size=SIZE, channels=3, codebook_size=K, code_dim=Z_CHANNELS, codebook_dim=CODE_DIM,
              l2_normalize=True)
CONV = VQVAEConfig(arch="conv", downsample=8, **COMMON)
VQGAN = VQVAEConfig(arch="vqgan", width=32, channel_mult=[1, 2, 2, 4], res_blocks=1, **COMMON)
NAMES = {"conv": "(a) vqtok conv", "vqgan": "(b) vqtok vqgan", "peer": "(c) vqgan + vector-quantize-pytorch"}


# ---------------------------------------------------------------------------------------------
# The photographs, split by picture, and their crops
# ---------------------------------------------------------------------------------------------
def picture(f: Path) -> str:
    """Which picture a file is: plasma's Flow/contents/images_dark/5120x2880.jpg -> Flow (its sizes and
    its dark variant are one picture); mate's Elephants_3840x2160.jpg -> mate/abstract/Elephants."""
    if "contents" in f.parts:
        return f.parts[f.parts.index("contents") - 1]
    return f.parent.name + "/" + re.sub(r"([-_]\d+x\d+|-[dl])$", "", f.stem)


def photographs() -> dict[str, Path]:
    """picture -> its largest colour JPEG of >= MIN_PIXELS (installing the packages when none is there)."""
    def scan() -> dict[str, Path]:
        best: dict[str, tuple[int, Path]] = {}
        for root in ROOTS:
            for f in sorted(root.rglob("*")):
                if f.suffix.lower() not in (".jpg", ".jpeg") or not f.is_file() or f.name.startswith("screenshot"):
                    continue
                f = f.resolve()  # plasma links its smaller sizes' names to the larger files
                with Image.open(f) as im:
                    area = im.size[0] * im.size[1]
                    if im.format != "JPEG" or im.mode != "RGB" or area < MIN_PIXELS:
                        continue
                key = picture(f)
                if key not in best or area > best[key][0]:
                    best[key] = (area, f)
        return {k: f for k, (_, f) in sorted(best.items())}

    found = scan()
    if len(found) < 40:
        print(f"installing the Debian packages {', '.join(PACKAGES)} ...", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=False)
        found = scan()
    if len(found) < 10:
        sys.exit(f"only {len(found)} colour JPEG photographs under {', '.join(map(str, ROOTS))}")
    return found


def split(pictures: list[str], held_out_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """A fixed fifth of the pictures, the first by sha1 of their names, held out whole."""
    ranked = sorted(pictures, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    n = max(1, round(held_out_fraction * len(ranked)))
    return sorted(ranked[n:]), sorted(ranked[:n])


def crops(path: Path, per_scale: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`per_scale` random 64x64 crops at each of SCALES (the photo's shorter side resized to it)."""
    img = Image.open(path)
    img.draft("RGB", (SCALES[-1] * 2, SCALES[-1] * 2))  # a faster decode, still >= 2x the largest scale
    img = img.convert("RGB")
    out = []
    for s in SCALES:
        w, h = img.size
        r = s / min(w, h)
        a = np.asarray(img.resize((max(s, round(w * r)), max(s, round(h * r))), Image.Resampling.BICUBIC))
        for _ in range(per_scale):
            y, x = rng.integers(0, a.shape[0] - SIZE + 1), rng.integers(0, a.shape[1] - SIZE + 1)
            out.append(a[y:y + SIZE, x:x + SIZE].copy())
    return out


def write_shards(images: np.ndarray, out: Path, prefix: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(images), SHARD):
        path = out / f"{prefix}-{s // SHARD:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + SHARD, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, "PNG")
                info = tarfile.TarInfo(f"{i:07d}.png")
                info.size = buf.tell()
                tar.addfile(info, io.BytesIO(buf.getvalue()))
        paths.append(str(path))
    return paths


def prepare_data(out: Path, train_crops: int, held_out_crops: int, seed: int):
    photos = photographs()
    train_p, held_p = split(list(photos))
    rng = np.random.default_rng(seed)
    data = {}
    for name, pics, n in (("train", train_p, train_crops), ("held_out", held_p, held_out_crops)):
        imgs = [c for p in pics for c in crops(photos[p], n, rng)]
        data[name] = np.stack(imgs)[rng.permutation(len(imgs))]
    held_order = np.stack([c for p in held_p for c in crops(photos[p], 1, np.random.default_rng(seed + 1))[:1]])
    if (out / "data").exists():
        shutil.rmtree(out / "data")
    shards = {name: write_shards(a, out / "data", name) for name, a in data.items()}
    return photos, train_p, held_p, data, shards, held_order


# ---------------------------------------------------------------------------------------------
# The peer: the same vqgan network around lucidrains' VectorQuantize
# ---------------------------------------------------------------------------------------------
class PeerVQGAN(nn.Module):
    """VQGANEncoder -> Linear 64->8 (our proj_in) -> VectorQuantize -> Linear 8->64 (our proj_out) ->
    VQGANDecoder. Modules are created in VQVAE's order, so the same seed gives (b)'s starting weights."""

    def __init__(self, cfg: VQVAEConfig, dead_threshold: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        shape = dict(channels=cfg.channels, width=cfg.width, channel_mult=cfg.channel_mult,
                     res_blocks=cfg.res_blocks, z_channels=cfg.code_dim)
        self.encoder, self.decoder = VQGANEncoder(**shape), VQGANDecoder(**shape)
        self.proj_in, self.proj_out = nn.Linear(cfg.code_dim, cfg.codebook_dim), nn.Linear(cfg.codebook_dim, cfg.code_dim)
        self.vq = VectorQuantize(dim=cfg.codebook_dim, codebook_size=cfg.codebook_size, decay=cfg.ema_decay,
                                 eps=cfg.ema_eps, kmeans_init=True, kmeans_iters=10, use_cosine_sim=True,
                                 threshold_ema_dead_code=dead_threshold, commitment_weight=cfg.beta,
                                 rotation_trick=False)

    def forward(self, x):
        z = self.encoder(x)  # (B, C, g, g)
        b, c, h, w = z.shape
        flat = self.proj_in(z.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, g*g, d)
        q, idx, loss = self.vq(flat)
        recon = self.decoder(self.proj_out(q).reshape(b, h, w, c).permute(0, 3, 1, 2))
        return recon, idx.reshape(b, h, w), loss


def train_peer(cfg: TrainConfig, units, dead_threshold: float) -> tuple[PeerVQGAN, float]:
    """The job's step (jobs/trainer.py), repeated for the peer: same seed, batches, optimizer, schedule."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = PeerVQGAN(cfg.model, dead_threshold)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    stream = ImageStream(units, Preprocess(image_size=SIZE, channels=3), seed=cfg.seed, rank=0, world_size=1,
                         shuffle_buffer=cfg.shuffle_buffer, max_pixels=cfg.max_image_pixels,
                         failures=FailureLog(verbose=False))
    batches = prefetch(stream.batches(cfg.batch_size, skip=0))
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        x = Preprocess.to_model(batch.pixels)
        recon, _, q_loss = model(x)
        mse = F.mse_loss(recon.float(), x)
        loss = mse + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            print(f"peer: step {step + 1}/{cfg.steps} loss {loss.item():.4f} mse {mse.item() / 4:.5f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    batches.close()
    return model.eval(), time.time() - t0


# ---------------------------------------------------------------------------------------------
# Held-out metrics, the same code for all three
# ---------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # (11, 11)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images in [0, 1]: gaussian 11x11 window,
    sigma 1.5, C1 = (0.01)^2, C2 = (0.03)^2, valid positions, mean over positions and channels."""
    c = a.shape[1]
    w = gaussian_window().to(a)[None, None].repeat(c, 1, 1, 1)  # (C, 1, 11, 11), depthwise
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


@torch.no_grad()
def held_out_metrics(forward, images: np.ndarray, batch: int = 256) -> dict:
    """forward: x in [-1, 1] (B, 3, S, S) -> (reconstruction, token indices)."""
    se, px, ssims, counts = 0.0, 0, [], torch.zeros(K, dtype=torch.float64)
    for i in range(0, len(images), batch):
        x = Preprocess.to_model(torch.from_numpy(images[i:i + batch]))
        recon, idx = forward(x)
        a, b = (x + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        se += float((a - b).pow(2).sum())
        px += a.numel()
        ssims.append(ssim(a.double(), b.double()))
        counts += torch.bincount(idx.flatten(), minlength=K).double()
    mse = se / px
    return {"psnr": 10 * np.log10(1 / mse), "ssim": float(torch.cat(ssims).mean()), "mse": mse,
            "usage": float((counts > 0).double().mean()), "perplexity": float(perplexity(counts))}


def reconstruct(forward, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        recon, _ = forward(Preprocess.to_model(torch.from_numpy(images)))
    return Preprocess.from_model(recon.float().clamp(-1, 1)).numpy()


def save_picture(rows: dict[str, np.ndarray], path: Path, scale: int = 2) -> None:
    """One row per entry (label on the left), the images side by side, upscaled x`scale` (nearest)."""
    n, s = len(next(iter(rows.values()))), SIZE * scale
    label_w, gap = 260, 2
    canvas = Image.new("RGB", (label_w + n * (s + gap), len(rows) * (s + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows.items()):
        y = r * (s + gap)
        draw.text((6, y + s // 2 - 6), label, fill="black")
        for i, im in enumerate(imgs):
            canvas.paste(Image.fromarray(im).resize((s, s), Image.Resampling.NEAREST), (label_w + i * (s + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps for all three (default: steps / 10, at most 200)")
    p.add_argument("--lr", type=float, default=None, help="peak lr for all three (default: TrainConfig's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, every run alike")
    p.add_argument("--train-crops", type=int, default=100, help="crops per training picture per scale")
    p.add_argument("--held-out-crops", type=int, default=16, help="crops per held-out picture per scale")
    p.add_argument("--dead-threshold", type=float, default=0.1,
                   help="the peer's threshold_ema_dead_code (EMA count per step below which a code is replaced)")
    p.add_argument("--only", default="conv,vqgan,peer", help="which of conv,vqgan,peer to train (timing runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/out/photo_quality")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    t_start = time.time()
    out = Path(args.out)
    only = args.only.split(",")

    photos, train_p, held_p, data, shards, held_row = prepare_data(out, args.train_crops, args.held_out_crops, args.seed)
    print(f"{len(photos)} photographs: {len(train_p)} train, {len(held_p)} held out ({', '.join(held_p)}); "
          f"{len(data['train']):,} train crops, {len(data['held_out']):,} held-out crops", flush=True)

    extra = {} if args.lr is None else {"lr": args.lr}
    warmup = min(200, args.steps // 10) if args.warmup is None else args.warmup
    results, pictures = {}, {"held-out original": held_row}
    for name in only:
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, not a resume
        cfg = TrainConfig(data=shards["train"], val_data=shards["held_out"], out=str(run_dir),
                          model=VQGAN if name != "conv" else CONV, steps=args.steps, batch_size=args.batch_size,
                          threads=args.threads, seed=args.seed, warmup_steps=warmup, log_every=max(1, min(250, args.steps // 5)),
                          checkpoint_every=args.steps, **extra)
        print(f"training {NAMES[name]}: {args.steps} steps of batch {args.batch_size}", flush=True)
        if name == "peer":
            model, secs = train_peer(cfg, list_units(shards["train"]), args.dead_threshold)
            forward = lambda x, m=model: m(x)[:2]  # noqa: E731
            job_psnr = None
        else:
            res = train_vqvae(cfg)
            secs = res.metrics["train_seconds_this_run"]
            job_psnr = res.metrics["held_out"]["psnr"]
            model = Tokenizer.load(res.tokenizer_dir).model.eval()
            forward = lambda x, m=model: (lambda r, q: (r, q.indices))(*m(x))  # noqa: E731
        m = held_out_metrics(forward, data["held_out"])
        m |= {"seconds": secs, "params": n_params(model), "job_psnr": job_psnr, "lr": cfg.lr}
        results[name] = m
        pictures[NAMES[name]] = reconstruct(forward, held_row)
        print(f"{NAMES[name]}: held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, usage {100 * m['usage']:.1f}%, "
              f"perplexity {m['perplexity']:.1f}; {secs:.0f} s", flush=True)

    pic = out / "reconstructions.png"
    save_picture(pictures, pic)
    rows = [[NAMES[n], f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{100 * m['usage']:.1f}%", f"{m['perplexity']:.1f}",
             f"{m['seconds']:.0f}", f"{m['params'] / 1e6:.2f}M"] for n, m in results.items()]
    body = table(["tokenizer", "held-out PSNR dB", "SSIM", "usage", "perplexity", "train s", "params"], rows)
    lr = next(iter(results.values()))["lr"]
    body += (
        f"\n\nData: {len(photos)} colour JPEG photographs of >= 1 Mpx from Debian's desktop-background packages "
        f"({', '.join(PACKAGES)}), one file per picture; split by picture: {len(train_p)} train, {len(held_p)} "
        f"held out ({', '.join(held_p)}). Each picture's shorter side resized to {' and '.join(map(str, SCALES))} "
        f"(bicubic), random {SIZE}x{SIZE} crops: {args.train_crops} per train picture per scale "
        f"({len(data['train']):,} crops), {args.held_out_crops} per held-out picture per scale "
        f"({len(data['held_out']):,}), as WebDataset shards.\n"
        f"All three: K={K}, {SIZE // 8}x{SIZE // 8} tokens, {Z_CHANNELS} encoder channels -> {CODE_DIM}-d "
        f"l2-normalised codes, {args.steps} steps of batch {args.batch_size}, AdamW lr {lr:g} ({warmup} warmup steps, "
        f"cosine to 10%), clip 1.0, commitment 0.25, seed {args.seed}, {args.threads} torch threads, the same "
        f"batches in the same order. (a) conv: downsample 8, width {CONV.width}, {CONV.res_blocks} res blocks. "
        f"(b) vqgan: width {VQGAN.width}, channel_mult {','.join(map(str, VQGAN.channel_mult))}, res_blocks "
        f"{VQGAN.res_blocks} (decoder {VQGAN.res_blocks + 1}); quantizer: vqtok's (EMA 0.99, k-means++ on "
        f"4xK vectors, restarts of codes unused for 100 steps). (c) the same network, projections and "
        f"starting weights as (b), quantizer vector-quantize-pytorch 1.32.0 VectorQuantize(EMA decay 0.99, "
        f"eps 1e-5, kmeans_init on its first batch, use_cosine_sim, threshold_ema_dead_code "
        f"{args.dead_threshold:g} (mean count per code per step: {args.batch_size * (SIZE // 8) ** 2 / K:.1f}), "
        f"commitment_weight 0.25, rotation_trick=False), trained by this script's copy of the job's step.\n"
        f"SSIM: gaussian 11x11, sigma 1.5, per channel, mean over held-out crops. Usage/perplexity: over all "
        f"held-out tokens. train s: the training loop. params: trainable (codebook excluded).\n"
        f"Reconstructions (rows: held-out originals, one crop per held-out picture; (a), (b), (c)): {pic}\n"
        + "".join(f"Cross-check: the job's own held-out PSNR for {NAMES[n]}: {m['job_psnr']:.2f} dB. "
                  for n, m in results.items() if m["job_psnr"] is not None)
        + f"\nWhole run: {time.time() - t_start:.0f} s.")
    print(body)
    if not args.no_append:
        append_results("Tokenizer quality on photographs (benchmarks/photo_quality.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
