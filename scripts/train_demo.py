"""Train the bundled demo model (64 px captioned shapes, SD1 layout) end to end; rerun the same command to resume.

    bash scripts/train_demo.sh OUT_DIR --work /tmp/loom-demo   # the bundled model: 7 minutes on one H200 (bf16)
    bash scripts/train_demo.sh OUT_DIR --minutes 600   # the same recipe on a CPU, resumed over sessions

Stages, each resumed where it stopped:
1. the autoencoder (its reconstructions judged by the adherence checker);
2. its decoder fine-tuned alone, the encoder frozen so the latent space stays put (as SD's ft-MSE
   VAE was made): shape colours and kinds are read back far better after it (judged again);
3. the UNet with its text encoder on the latents of the frozen encoder (adherence on held-out
   captions printed as it trains); the checkpoint carries the fine-tuned decoder;
4. the checker through the engine's txt2img workflow with a guidance sweep.
`--minutes` is split 25% / 20% / 45% between the three training stages, the rest for data and checks.
OUT_DIR receives loom-shapes-64.safetensors, figures.json, loss.png and three sample grids (six
files); the resume states and the other intermediate files stay in the --work folder (OUT_DIR
itself by default), one subfolder per stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prompt_adherence import generate as engine_generate  # noqa: E402
from benchmarks.prompt_adherence import score  # noqa: E402
from ldm.training.data import evaluation_scenes, render_scenes, shapes_dataset  # noqa: E402
from ldm.training.loop import History, LoopConfig, plot_losses, save_grid  # noqa: E402
from ldm.training.unet_trainer import UNetTrainConfig, generate, train_unet  # noqa: E402
from ldm.training.vae_trainer import VAETrainConfig, train_vae  # noqa: E402

CHECKPOINT = "loom-shapes-64.safetensors"
SIZE = 64
SHARES = {"vae": 0.25, "decoder": 0.20, "unet": 0.45}  # of --minutes; the rest: data, checks


@dataclass(frozen=True)
class Profile:
    """Sizes per device. The GPU pools give each training caption ~15 distinct pictures (jittered
    placement), each encoded once. bf16 autocast pays on CPUs with AMX or AVX-512 BF16 too (2.4x
    for an autoencoder step on the machine that trained the bundled model)."""

    vae_images: int
    vae_batch: int
    decoder_batch: int
    unet_images: int
    unet_batch: int
    precision: str


# v-prediction with offset noise: with noise prediction alone the model took each picture's colour
# from what SD's schedule leaks of the latent at its noisiest step, not from the caption, and drew
# random backgrounds (5% right after a 62-minute CPU run); with these, 86% after 500 steps.
PREDICTION, OFFSET_NOISE = "v", 0.1
PROFILES = {"cuda": Profile(32768, 512, 512, 65536, 1024, "bf16"), "cpu": Profile(4096, 16, 16, 8192, 32, "bf16")}


def _judge(images: torch.Tensor, scenes: list) -> dict[str, float]:
    return score(((images.float().cpu() + 1) / 2).permute(0, 2, 3, 1), scenes)


def _print(label: str, figures: dict[str, float]) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.0%}" for k, v in figures.items()), flush=True)


def _txt2img(path: Path, model, captions: list[str], cfg: float, seed: int) -> tuple[torch.Tensor, str]:
    """Images [N, H, W, 3] in 0..1 through the engine; through the library's sampler (same sampler, steps
    and seeds) where the engine cannot be imported, as on a bare GPU machine without pydantic."""
    try:
        return engine_generate(path, captions, steps=20, cfg=cfg, size=SIZE, seed=seed), "engine"
    except ImportError as exc:
        images = torch.cat([generate(model, [caption], cfg=cfg, steps=20, seed=seed + i, prediction=PREDICTION)
                            for i, caption in enumerate(captions)])
        return ((images.float().cpu() + 1) / 2).permute(0, 2, 3, 1), f"ldm.sampling, engine unavailable: {exc}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder: the checkpoint, figures.json and four PNGs")
    parser.add_argument("--work", type=Path, help="folder for the resume state and intermediate files (default: OUT)")
    parser.add_argument("--minutes", type=float, default=7.0,
                        help="the whole run's time, across resumes: 25%% autoencoder, 20%% decoder, 45%% UNet, "
                             "the rest data and checks")
    parser.add_argument("--max-steps", type=int, help="also stop each stage after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-n", type=int, default=100,
                        help="held-out captions for the final check (at most 64 of them while training; twice "
                             "as many pictures for the reconstruction checks)")
    parser.add_argument("--cfg", type=float, nargs="+", default=[2.0, 3.0, 5.0], help="guidance values to sweep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = args.work or args.out
    device = torch.device(args.device)
    profile = PROFILES[device.type]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for folder in (work, args.out):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "minutes": args.minutes}

    def publish(*names: str) -> None:
        """Write figures.json and hand finished files to OUT at once, so a run cut short keeps them."""
        figures["seconds_so_far"] = round(time.perf_counter() - started, 1)
        (work / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
        if args.out.resolve() != work.resolve():
            for name in ("figures.json", *names):
                shutil.copy2(work / name, args.out / name)

    eval_scenes = evaluation_scenes(max(args.eval_n, 64), args.seed)
    # Reconstructions are judged on twice as many held-out pictures as the final check's captions (200 by default).
    recon_scenes = evaluation_scenes(2 * args.eval_n, args.seed)
    eval_pixels = render_scenes(recon_scenes, SIZE, seed=args.seed + 7, device=device)

    def loop_config(stage: str, batch: int, lr: float, warmup: int, ema: float, seed: int) -> LoopConfig:
        return LoopConfig(minutes=SHARES[stage] * args.minutes, max_steps=args.max_steps, batch_size=batch, lr=lr,
                          warmup_steps=warmup, precision=profile.precision, ema_decay=ema, seed=seed,
                          log_every=50, sample_every=1000, save_every=1000)

    def judge_reconstructions(stage: str, vae) -> None:
        with torch.no_grad():
            reconstructions = torch.cat([vae.decode(vae.encode(chunk).mean) for chunk in eval_pixels.split(100)])
        figures[f"{stage}_reconstruction"] = _judge(reconstructions, recon_scenes)
        _print(f"{stage} reconstructions of held-out pictures", figures[f"{stage}_reconstruction"])

    # Stage 1: the autoencoder. Everything downstream is capped by how well it keeps colours and shapes.
    vae_pictures = shapes_dataset(profile.vae_images, args.seed, SIZE, device)
    vae_config = VAETrainConfig(loop=loop_config("vae", profile.vae_batch, 1e-3, 100, 0.998, args.seed))
    vae = train_vae(vae_pictures, work / "vae", vae_config, device)
    judge_reconstructions("vae", vae)
    figures["settings"] = {"vae": asdict(vae_config)}

    # Stage 2: the decoder alone. The encoder is frozen, so latents (and any UNet trained on them) stay valid.
    decoder_config = VAETrainConfig(loop=loop_config("decoder", profile.decoder_batch, 5e-4, 100, 0.998,
                                                     args.seed + 2), train_encoder=False)
    vae = train_vae(vae_pictures, work / "decoder", decoder_config, device, vae)
    judge_reconstructions("decoder", vae)
    figures["settings"]["decoder"] = asdict(decoder_config)
    shutil.copy2(work / "decoder" / "vae-samples.png", work / "vae-samples.png")
    publish("vae-samples.png")

    # Stage 3: UNet and text encoder, judged on held-out captions as they train.
    progress: list[dict] = []

    def check(model, step: int) -> None:
        scenes = eval_scenes[:min(64, args.eval_n)]
        images = generate(model, [s.caption for s in scenes], cfg=5.0, steps=15, seed=args.seed,
                          prediction=PREDICTION)
        figures_now = _judge(images, scenes)
        progress.append({"step": step, **figures_now})
        _print(f"\nadherence at step {step} (cfg 5, {len(scenes)} held-out captions)", figures_now)

    unet_config = UNetTrainConfig(loop=loop_config("unet", profile.unet_batch, 6e-4, 200, 0.999, args.seed + 1),
                                  prediction=PREDICTION, offset_noise=OFFSET_NOISE)
    model, path = train_unet(shapes_dataset(profile.unet_images, args.seed + 1, SIZE, device), work / "unet",
                             unet_config, device, vae, on_sample=check, checkpoint_name=CHECKPOINT,
                             preview_captions=[s.caption for s in eval_scenes[:32]])
    figures["training_progress"] = progress
    figures["train_seconds"] = round(time.perf_counter() - started, 1)
    figures["checkpoint_mib"] = round(path.stat().st_size / 2**20, 2)
    figures["settings"]["unet"] = asdict(unet_config)
    histories = {}
    for stage, name in (("vae", "vae"), ("decoder", "vae"), ("unet", "unet")):
        state = torch.load(work / stage / f"{name}-state.pt", map_location="cpu", weights_only=True)
        histories[stage] = History(state["history_steps"], state["history_losses"])
    plot_losses(histories, work / "loss.png")
    for name in (CHECKPOINT, "unet-samples.png"):
        shutil.copy2(work / "unet" / name, work / name)
    path = work / CHECKPOINT
    publish(CHECKPOINT, "unet-samples.png", "loss.png")

    # Stage 4: the independent checker, through the engine, with a guidance sweep.
    scenes = eval_scenes[:args.eval_n]
    sweep: dict[str, dict] = {}
    figures["adherence_by_cfg"] = sweep
    best_images = None
    for cfg in args.cfg:
        images, figures["evaluated_with"] = _txt2img(path, model, [s.caption for s in scenes], cfg, args.seed)
        sweep[str(cfg)] = score(images, scenes, args.seed)
        _print(f"txt2img ({figures['evaluated_with']}), cfg {cfg}", sweep[str(cfg)])
        if best_images is None or sweep[str(cfg)]["all"] > figures["adherence"]["all"]:
            figures["best_cfg"], figures["adherence"], best_images = cfg, sweep[str(cfg)], images
            save_grid(best_images[:64].permute(0, 3, 1, 2) * 2 - 1, work / "samples.png")
        publish("samples.png")
    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    publish()
    print(json.dumps({"checkpoint": str(args.out / CHECKPOINT), "best_cfg": figures["best_cfg"],
                      **figures["adherence"], "total_seconds": figures["total_seconds"]}))


if __name__ == "__main__":
    main()
