"""Model benchmark: checkpoint load time and memory, UNet step and VAE decode time, ours vs diffusers.

    python -m benchmarks.models [--quick] [--reps N]

Writes a random-weight `sd15` checkpoint (fp16) to a temp dir, loads it in a fresh process to
measure time and peak RSS, then times our UNet (batch 2, as with guidance) and VAE decode against
diffusers' modules holding the same weights, at 256 and 512 px. On a CUDA GPU it runs in fp16,
otherwise fp32 on the CPU. `--quick` uses the tiny SD1 preset at 64 and 128 px (keys named by
those sizes), for a smoke test.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _measure_load(path: str, device: str, dtype: str) -> None:
    """Run in a child process: load the checkpoint once and print time and peak RSS as JSON."""
    import ldm.text_encoders  # noqa: F401  (imported before the clock starts: its import is not loading)
    from ldm.checkpoint import load_checkpoint

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loaded = load_checkpoint(path, device=device, dtype=getattr(torch, dtype))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": seconds, "rss_before": before, "rss_peak": peak,
                      "unused_keys": len(loaded.unused_keys)}))


def _time(fn, reps: int, device: torch.device) -> float:
    """Best of `reps` timed calls after one warm-up (the minimum is the least disturbed by other load)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _compare(ours, theirs, reps: int, device: torch.device) -> tuple[float, float]:
    """Alternate ours and theirs so that a burst of load elsewhere hits both."""
    ours_s, theirs_s = float("inf"), float("inf")
    for _ in range(reps):
        ours_s = min(ours_s, _time(ours, 1, device))
        theirs_s = min(theirs_s, _time(theirs, 1, device))
    return ours_s, theirs_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small images (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--measure-load", nargs=3, metavar=("PATH", "DEVICE", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        _measure_load(*args.measure_load)
        return

    from ldm.checkpoint import load_checkpoint
    from ldm.presets import make_checkpoint
    from tests.ldm.diffusers_reference import diffusers_unet, diffusers_vae

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    preset = "tiny-sd1" if args.quick else "sd15"
    sizes = (64, 128) if args.quick else (256, 512)
    results: dict[str, object] = {"preset": preset, "device": str(device), "dtype": str(dtype).split(".")[1],
                                  "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = make_checkpoint(preset, Path(tmp) / f"{preset}.safetensors", seed=0)
        results["make_checkpoint_s"] = round(time.perf_counter() - start, 2)
        file_size = path.stat().st_size
        # Load in the file's own dtype (fp16) so the figure is about copies, not about widening.
        child = subprocess.run([sys.executable, "-m", "benchmarks.models", "--measure-load", str(path),
                                str(device), "float16"], capture_output=True, text=True, check=True)
        load = json.loads(child.stdout.strip().splitlines()[-1])
        growth = load["rss_peak"] - load["rss_before"]
        results.update(file_gb=round(file_size / 1e9, 3), load_s=round(load["load_s"], 2),
                       load_rss_over_file=round(load["rss_peak"] / file_size, 3),
                       load_rss_growth_over_file=round(growth / file_size, 3))
        loaded = load_checkpoint(path, device=device, dtype=dtype, text_encoder=False)

    unet, vae = loaded.unet, loaded.vae
    their_unet = diffusers_unet(unet.config, unet.state_dict()).to(device, dtype)
    their_vae = diffusers_vae(vae.config, vae.state_dict()).to(device, dtype)
    context_dim = unet.config.context_dim
    with torch.inference_mode():
        for size in sizes:
            latent = size // vae.config.downscale
            x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
            t = torch.tensor([999.0, 999.0], device=device)
            context = torch.randn(2, 77, context_dim, device=device, dtype=dtype)
            ours_s, theirs_s = _compare(lambda x=x, t=t, c=context: unet(x, t, c),
                                        lambda x=x, t=t, c=context: their_unet(x, t, c),
                                        args.reps, device)
            results.update({f"unet_ours_{size}_s": round(ours_s, 4),
                            f"unet_diffusers_{size}_s": round(theirs_s, 4),
                            f"unet_ratio_{size}": round(ours_s / theirs_s, 3)})
            z = x[:1]
            ours_s, theirs_s = _compare(lambda z=z: vae.decode(z), lambda z=z: their_vae.decode(z),
                                        args.reps, device)
            results.update({f"vae_decode_ours_{size}_s": round(ours_s, 4),
                             f"vae_decode_diffusers_{size}_s": round(theirs_s, 4),
                             f"vae_decode_ratio_{size}": round(ours_s / theirs_s, 3)})
            print(f"{size}px: " + ", ".join(f"{k}={v}" for k, v in results.items() if f"_{size}" in k),
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
