"""The README's main job runs end to end in a smoke configuration, and re-running resumes."""

import json
import os

from experiments import quickstart

SMOKE = [
    "--config.train.steps=4",
    "--config.train.ckpt_every=2",
    "--config.train.log_every=2",
    "--config.train.batch_size=32",
    "--config.eval.num_samples=20",
    "--config.eval.ddpm_steps=12",
    "--config.eval.nfe=4",
    "--config.eval.classifier_steps=4",
]


def test_quickstart_smoke_and_resume(tmp_path):
    workdir = str(tmp_path / "qs")
    report = quickstart.main(["--workdir", workdir, *SMOKE])
    names = set(report["samplers"])
    assert {"DDIM", "DPM-Solver++(2M)", "F-PNDM", "EDM-Heun", "TS-DDIM"} <= names
    assert any(n.startswith("DDPM-12") for n in names)
    for r in report["samplers"].values():
        assert r["feature_fd"] >= 0 and 0 <= r["accuracy"] <= 1
    assert report["train"]["steps"] == 4
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["train"]["steps"] == 4
    pngs = os.listdir(os.path.join(workdir, "samples"))
    assert len([p for p in pngs if p.endswith(".png")]) == len(names)
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]

    # a second run with more steps resumes from step 4 instead of starting over
    report2 = quickstart.main(["--workdir", workdir, *SMOKE[1:], "--config.train.steps=6"])
    assert report2["train"]["steps"] == 6
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]
