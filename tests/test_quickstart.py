"""The README's main job runs end to end in a smoke configuration, and re-running resumes."""

import json
import os

from experiments import quickstart
from experiments._cli import apply_overrides
from experiments._runner import train_denoiser

SMOKE = [
    "train.steps=4",
    "train.ckpt_every=2",
    "train.log_every=2",
    "train.batch_size=32",
    "eval.num_samples=20",
    "eval.ddpm_steps=12",
    "eval.nfe=4",
    "eval.classifier_steps=4",
]


def _steps_logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_quickstart_smoke_and_resume(tmp_path):
    workdir = str(tmp_path / "qs")
    report = quickstart.main(["--workdir", workdir, *("--config." + s for s in SMOKE)])
    names = set(report["samplers"])
    assert {"DDIM", "DPM-Solver++(2M)", "F-PNDM", "EDM-Heun", "TS-DDIM"} <= names
    assert any(n.startswith("DDPM-12") for n in names)
    for r in report["samplers"].values():
        assert r["feature_fd"] >= 0 and 0 <= r["accuracy"] <= 1
    assert report["train"]["steps"] == 4
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["train"]["steps"] == 4
    pngs = [p for p in os.listdir(os.path.join(workdir, "samples")) if p.endswith(".png")]
    assert len(pngs) == len(names)
    assert _steps_logged(workdir) == [2, 4]

    # re-running with more steps resumes from step 4 (parameters, data position) instead of
    # starting over; a finished run trains nothing
    config = apply_overrides(quickstart.get_config(), [*SMOKE, "train.steps=6"])
    trained = train_denoiser(config, workdir, progress=False)
    assert trained.steps_run == 2 and int(trained.state.step) == 6
    assert _steps_logged(workdir) == [2, 4, 6]
    again = train_denoiser(config, workdir, progress=False)
    assert again.steps_run == 0 and int(again.state.step) == 6
