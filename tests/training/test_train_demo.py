"""The demo model's one command (scripts/train_demo.py): all four stages at toy sizes, then resumed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import load_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo.py"


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    module.PROFILES["cpu"] = module.Profile(64, 4, 4, 64, 4, "bf16")
    return module


def test_one_command_trains_every_stage_and_resumes(tmp_path, train_demo, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(out), "--work", str(work), "--max-steps", "3", "--minutes", "5", "--device", "cpu",
            "--eval-n", "4", "--cfg", "2"]
    train_demo.main(argv)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["loom-shapes-64.safetensors", "figures.json", "loss.png", "vae-samples.png", "unet-samples.png",
         "samples.png"])
    figures = json.loads((out / "figures.json").read_text())
    assert {"vae_reconstruction", "decoder_reconstruction", "adherence", "adherence_by_cfg"} <= figures.keys()
    assert figures["settings"]["decoder"]["train_encoder"] is False

    # The checkpoint carries the stage-2 decoder and the stage-1 encoder (whose latents the UNet learnt).
    model = load_checkpoint(out / "loom-shapes-64.safetensors")
    stage1, stage2 = (load_file(work / stage / "vae.safetensors") for stage in ("vae", "decoder"))
    vae = model.vae.state_dict()
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        source = stage2 if key.startswith("decoder") else stage1
        torch.testing.assert_close(vae[key].float(), source["first_stage_model." + key].float(), rtol=0, atol=1e-3)
    decoder = "first_stage_model.decoder.conv_out.weight"
    assert not torch.equal(stage1[decoder], stage2[decoder])

    # Rerunning the same command resumes: every stage is already at its budget, nothing trains again.
    before = load_file(out / "loom-shapes-64.safetensors")
    capsys.readouterr()
    train_demo.main(argv)
    log = capsys.readouterr().out
    assert log.count("resuming at step 3") == 3
    after = load_file(out / "loom-shapes-64.safetensors")  # the same weights (the metadata has new timings)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
