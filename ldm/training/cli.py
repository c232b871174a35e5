"""`main.py train vae|unet|lora`: the command-line options of the training library (torch loads only when run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder; holds the resume state too")
    parser.add_argument("--data", default="shapes",
                        help="'shapes' (the procedural dataset) or a folder of images with same-named .txt captions")
    parser.add_argument("--images", type=int, default=4096, help="how many shapes pictures to render")
    parser.add_argument("--size", type=int, default=64, help="image side (a caption folder's bucket base size)")
    parser.add_argument("--minutes", type=float, help="training time budget (counts across resumes)")
    parser.add_argument("--max-steps", type=int, help="step budget (counts across resumes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--sample-every", type=int, default=500, help="steps between sample grids and loss plots")
    parser.add_argument("--save-every", type=int, default=500, help="steps between resume states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def add_train_parser(sub: Any) -> None:
    """Add `train` with its `vae` and `unet` stages to the main parser's sub-commands."""
    train = sub.add_parser("train", help="train the autoencoder or the diffusion model (docs/training.md)")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    vae = stages.add_parser("vae", help="train the KL autoencoder; writes OUT/vae.safetensors")
    _common(vae)
    vae.add_argument("--init-vae", type=Path, help="fine-tune this VAE (or checkpoint) instead of a new one")
    vae.add_argument("--decoder-only", action="store_true",
                     help="freeze the encoder: the latent space stays exactly the same, so UNets trained on "
                          "--init-vae's latents keep working with the result")
    vae.add_argument("--kl-weight", type=float, default=1e-6)
    vae.add_argument("--edge-weight", type=float, default=0.5)
    unet = stages.add_parser("unet", help="train the UNet and text encoder; writes OUT/OUTPUT_NAME")
    _common(unet)
    unet.add_argument("--vae", type=Path, help="the autoencoder: a VAE file or a checkpoint (default: --init's)")
    unet.add_argument("--init", type=Path, help="fine-tune this SD1 checkpoint instead of new models")
    unet.add_argument("--freeze-text-encoder", action="store_true")
    unet.add_argument("--prediction", choices=("eps", "v"), default="eps")
    unet.add_argument("--offset-noise", type=float, default=0.0,
                      help="std of a per-channel constant added to the noise, so overall colour follows the caption")
    unet.add_argument("--cond-dropout", type=float, default=0.1, help="share of empty captions, for guidance")
    unet.add_argument("--output-name", default="model.safetensors")
    lora = stages.add_parser("lora", help="train a LoRA for a checkpoint's UNet; writes OUT/OUTPUT_NAME")
    _common(lora)
    lora.add_argument("--init", type=Path, required=True, help="the SD1, SD2 or SDXL checkpoint the LoRA is for")
    lora.add_argument("--rank", type=int, default=8, help="the adapters' rank (kohya's network_dim)")
    lora.add_argument("--alpha", type=float, help="kohya's network_alpha; the update is scaled by alpha/rank "
                                                  "(default: the rank, scale 1)")
    lora.add_argument("--targets", choices=("transformer", "attention"), default="transformer",
                      help="every Linear and 1x1 convolution in the transformer blocks (kohya's default), or "
                           "the attention projections only")
    lora.add_argument("--cond-dropout", type=float, default=0.0, help="share of empty captions")
    lora.add_argument("--offset-noise", type=float, default=0.0)
    lora.add_argument("--prediction", choices=("eps", "v"), help="what the checkpoint predicts (default: as detected)")
    lora.add_argument("--output-name", default="lora.safetensors")
    lora.add_argument("--save-precision", choices=("fp16", "fp32"), default="fp16")
    # A LoRA run is short: no weight averaging, kohya's learning rate, a small batch.
    # --size None: the checkpoint's own resolution.
    lora.set_defaults(ema_decay=0.0, lr=1e-4, batch_size=4, warmup_steps=50, size=None)
    for parser in (vae, unet, lora):
        parser.set_defaults(func=run_train)


def _data(args: argparse.Namespace, device: Any) -> Any:
    from ldm.training.data import caption_folder, shapes_dataset

    if args.data == "shapes":
        return shapes_dataset(args.images, args.seed, args.size, device)
    return caption_folder(args.data, base=args.size)


def run_train(args: argparse.Namespace) -> int:
    """Train as asked; a file that cannot be used or a bad setting ends with its message, not a traceback."""
    from ldm.checkpoint import CheckpointError

    try:
        return _train(args)
    except (CheckpointError, OSError, ValueError) as exc:  # OSError: a missing folder, an unreadable image
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the loop has saved its state and said so
        return 130


def _train(args: argparse.Namespace) -> int:
    import torch

    from ldm.checkpoint import load_checkpoint, load_vae
    from ldm.training.loop import LoopConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.minutes is None and args.max_steps is None:
        raise SystemExit("give a budget: --minutes, --max-steps or both")
    loop = LoopConfig(max_steps=args.max_steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, precision=args.precision,
                      grad_checkpointing=args.grad_checkpointing, ema_decay=args.ema_decay, seed=args.seed,
                      sample_every=args.sample_every, save_every=args.save_every)
    base = load_checkpoint(args.init) if getattr(args, "init", None) else None
    if args.size is None:  # train lora: the checkpoint's resolution
        from ldm.checkpoint import NATIVE_RESOLUTION

        args.size = int(base.metadata.get("loom.resolution", NATIVE_RESOLUTION.get(base.family.name, 512)))
    data = _data(args, device)
    if args.stage == "vae":
        from ldm.training.vae_trainer import VAETrainConfig, train_vae

        init = load_vae(args.init_vae).vae if args.init_vae else None
        if args.decoder_only and init is None:
            raise SystemExit("--decoder-only fine-tunes an existing decoder: give --init-vae")
        config = VAETrainConfig(loop=loop, kl_weight=args.kl_weight, edge_weight=args.edge_weight,
                                train_encoder=not args.decoder_only)
        train_vae(data, args.out, config, device, init)
        print(f"wrote {args.out / 'vae.safetensors'}")
        return 0
    if args.stage == "lora":
        from ldm.training.lora_trainer import LoraTrainConfig, train_lora

        if args.rank < 1:
            raise ValueError("--rank must be 1 or more")
        config = LoraTrainConfig(rank=args.rank, alpha=float(args.rank if args.alpha is None else args.alpha),
                                 targets=args.targets, cond_dropout=args.cond_dropout, offset_noise=args.offset_noise,
                                 prediction=args.prediction, loop=loop)
        path = train_lora(data, args.out, config, base, device, args.output_name,
                          save_dtype=torch.float16 if args.save_precision == "fp16" else torch.float32)
        print(f"wrote {path}")
        return 0
    from ldm.training.unet_trainer import UNetTrainConfig, train_unet

    if args.vae is not None:
        vae = load_vae(args.vae).vae
    elif base is not None:
        vae = base.vae
    else:
        raise SystemExit("train unet needs --vae (from `train vae`) or --init (a checkpoint to fine-tune)")
    config = UNetTrainConfig(loop=loop, train_text_encoder=not args.freeze_text_encoder,
                             cond_dropout=args.cond_dropout, prediction=args.prediction,
                             offset_noise=args.offset_noise)
    _, path = train_unet(data, args.out, config, device, vae, base.unet if base else None,
                         base.text_encoder if base else None, checkpoint_name=args.output_name)
    print(f"wrote {path}")
    return 0
