"""Train the bundled demo model (64 px captioned shapes, SD1 layout) end to end; rerun the same command to resume.

    bash scripts/train_demo.sh OUT_DIR --work /tmp/loom-demo   # about 8 minutes on one H100/H200 (bf16)
    bash scripts/train_demo.sh OUT_DIR --minutes 60    # the same, slowly, on a CPU

Stages: the autoencoder (its reconstructions judged by the adherence checker), then the UNet with
its text encoder (adherence on held-out captions printed as it trains), then the checker through
the engine's txt2img workflow with a guidance sweep. OUT_DIR receives loom-shapes-64.safetensors,
figures.json, loss.png and three sample grids (six files); the resume state and the other
intermediate files stay in the --work folder (OUT_DIR itself by default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
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
# Per device: (VAE images, VAE batch, UNet images, UNet batch, precision). The GPU pools give each
# training caption ~15 distinct pictures (jittered placement), each encoded once.
# v-prediction with offset noise: with noise prediction alone the model took each picture's colour
# from what SD's schedule leaks of the latent at its noisiest step, not from the caption, and drew
# random backgrounds (5% right after a 62-minute CPU run); with these, 86% after 500 steps.
PREDICTION, OFFSET_NOISE = "v", 0.1
PROFILES = {"cuda": (32768, 512, 65536, 1024, "bf16"), "cpu": (2048, 16, 4096, 32, "fp32")}


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
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="the whole run's time: 40%% autoencoder, 40%% UNet, the rest data and checks")
    parser.add_argument("--max-steps", type=int, help="also stop each stage after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-n", type=int, default=100, help="held-out captions for the final check")
    parser.add_argument("--cfg", type=float, nargs="+", default=[5.0, 3.0, 7.5], help="guidance values to sweep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = args.work or args.out
    device = torch.device(args.device)
    vae_images, vae_batch, unet_images, unet_batch, precision = PROFILES[device.type]
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

    eval_scenes = evaluation_scenes(200, args.seed)
    eval_pixels = render_scenes(eval_scenes, SIZE, seed=args.seed + 7, device=device)

    # Stage 1: the autoencoder. Everything downstream is capped by how well it keeps colours and shapes.
    vae_loop = LoopConfig(minutes=0.4 * args.minutes, max_steps=args.max_steps, batch_size=vae_batch, lr=1e-3,
                          warmup_steps=100, precision=precision, ema_decay=0.998, seed=args.seed,
                          log_every=50, sample_every=1000, save_every=1000)
    vae_config = VAETrainConfig(loop=vae_loop)
    vae = train_vae(shapes_dataset(vae_images, args.seed, SIZE, device), work, vae_config, device)
    with torch.no_grad():
        reconstructions = torch.cat([vae.decode(vae.encode(chunk).mean) for chunk in eval_pixels.split(100)])
    figures["vae_reconstruction"] = _judge(reconstructions, eval_scenes)
    _print("VAE reconstructions of held-out pictures", figures["vae_reconstruction"])
    figures["settings"] = {"vae": asdict(vae_config)}
    publish("vae-samples.png")

    # Stage 2: UNet and text encoder, judged on held-out captions as they train.
    progress: list[dict] = []

    def check(model, step: int) -> None:
        scenes = eval_scenes[:64]
        images = generate(model, [s.caption for s in scenes], cfg=5.0, steps=15, seed=args.seed,
                          prediction=PREDICTION)
        figures_now = _judge(images, scenes)
        progress.append({"step": step, **figures_now})
        _print(f"\nadherence at step {step} (cfg 5, 64 held-out captions)", figures_now)

    unet_loop = LoopConfig(minutes=0.4 * args.minutes, max_steps=args.max_steps, batch_size=unet_batch, lr=6e-4,
                           warmup_steps=200, precision=precision, ema_decay=0.999, seed=args.seed + 1,
                           log_every=50, sample_every=1000, save_every=1000)
    unet_config = UNetTrainConfig(loop=unet_loop, prediction=PREDICTION, offset_noise=OFFSET_NOISE)
    model, path = train_unet(shapes_dataset(unet_images, args.seed + 1, SIZE, device), work, unet_config,
                             device, vae, on_sample=check, checkpoint_name=CHECKPOINT,
                             preview_captions=[s.caption for s in eval_scenes[:32]])
    figures["training_progress"] = progress
    figures["train_seconds"] = round(time.perf_counter() - started, 1)
    figures["checkpoint_mib"] = round(path.stat().st_size / 2**20, 2)
    figures["settings"]["unet"] = asdict(unet_config)
    histories = {}
    for name in ("vae", "unet"):
        state = torch.load(work / f"{name}-state.pt", map_location="cpu", weights_only=True)
        histories[name] = History(state["history_steps"], state["history_losses"])
    plot_losses(histories, work / "loss.png")
    publish(CHECKPOINT, "unet-samples.png", "loss.png")

    # Stage 3: the independent checker, through the engine, with a guidance sweep.
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
