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


def _make(preset: str, path: str) -> None:
    """Run in a child process, so the parent stays small (a child's ru_maxrss starts at its parent's)."""
    from ldm.presets import make_checkpoint

    make_checkpoint(preset, path, seed=0)


def _measure_load(path: str, device: str, dtype: str) -> None:
    """Run in a child process: load the checkpoint, read every weight once, print time and peak RSS."""
    import ldm.text_encoders  # noqa: F401  (imported before the clock starts: its import is not loading)
    from ldm.checkpoint import load_checkpoint

    if device.startswith("cuda"):
        # The CUDA context and its libraries take about a GB of host memory whatever is loaded: start
        # them before the baseline, so that the figures are about the checkpoint.
        torch.ones(1, device=device).sum().item()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loaded = load_checkpoint(path, device=device, dtype=getattr(torch, dtype))
    call = time.perf_counter() - start
    # Memory-mapped weights are only read when used; touch them all so the figures include that.
    modules = (loaded.unet, loaded.vae, loaded.text_encoder)
    touched = sum(float(p.sum()) for m in modules for p in m.parameters())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": seconds, "load_call_s": call, "rss_before": before, "rss_peak": peak,
                      "unused_keys": len(loaded.unused_keys), "touched": touched}))


def _time(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _compare(name: str, ours, theirs, reps: int, device: torch.device) -> dict[str, float]:
    """Best-of-`reps` times of ours and diffusers', alternating so that load elsewhere hits both.

    On a CPU the ratio uses process CPU time, which other programs on a shared machine disturb far
    less than wall time; on a GPU it uses wall time. Both are reported.
    """
    ours(), theirs()  # warm-up
    best = {"ours": [float("inf")] * 2, "diffusers": [float("inf")] * 2}
    for _ in range(reps):
        for who, fn in (("ours", ours), ("diffusers", theirs)):
            best[who] = [min(a, b) for a, b in zip(best[who], _time(fn, device), strict=True)]
    pick = 0 if device.type == "cuda" else 1
    out = {f"{name}_{who}_{kind}": round(best[who][i], 4)
           for who in best for i, kind in enumerate(("wall_s", "cpu_s"))}
    out[_ratio_key(name)] = round(best["ours"][pick] / best["diffusers"][pick], 3)
    return out


def _ratio_key(name: str) -> str:
    """unet_256 -> unet_ratio_256, vae_decode_256 -> vae_decode_ratio_256."""
    stem, size = name.rsplit("_", 1)
    return f"{stem}_ratio_{size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small images (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--measure-load", nargs=3, metavar=("PATH", "DEVICE", "DTYPE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("PRESET", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        _measure_load(*args.measure_load)
        return
    if args.make:
        _make(*args.make)
        return

    from ldm.checkpoint import load_checkpoint
    from tests.ldm.diffusers_reference import diffusers_unet, diffusers_vae

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    preset = "tiny-sd1" if args.quick else "sd15"
    sizes = (64, 128) if args.quick else (256, 512)
    results: dict[str, object] = {"preset": preset, "device": str(device), "dtype": str(dtype).split(".")[1],
                                  "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(tmp) / f"{preset}.safetensors"
        subprocess.run([sys.executable, "-m", "benchmarks.models", "--make", preset, str(path)], check=True)
        results["make_checkpoint_s"] = round(time.perf_counter() - start, 2)
        file_size = path.stat().st_size
        # Load in the file's own dtype (fp16) so the figure is about copies, not about widening.
        child = subprocess.run([sys.executable, "-m", "benchmarks.models", "--measure-load", str(path),
                                str(device), "float16"], capture_output=True, text=True, check=True)
        load = json.loads(child.stdout.strip().splitlines()[-1])
        growth = load["rss_peak"] - load["rss_before"]
        results.update(file_gb=round(file_size / 1e9, 3), load_s=round(load["load_s"], 2),
                       load_call_s=round(load["load_call_s"], 2),
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
            results.update(_compare(f"unet_{size}", lambda x=x, t=t, c=context: unet(x, t, c),
                                    lambda x=x, t=t, c=context: their_unet(x, t, c), args.reps, device))
            z = x[:1]
            results.update(_compare(f"vae_decode_{size}", lambda z=z: vae.decode(z),
                                    lambda z=z: their_vae.decode(z), args.reps, device))
            print(f"{size}px: " + ", ".join(f"{k}={v}" for k, v in results.items() if k.endswith(f"_{size}")
                                            or f"_{size}_" in k), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
