"""Train a diffusion denoiser on any data source.

    python -m experiments.train --workdir runs/digits \\
        --config experiments.train --config.train.steps=5000 --config.data.name=digits
    python -m experiments.train --workdir runs/mine --config.model.num_classes=None \\
        --config.data.name=folder --config.data.kwargs.path=path/to/images

Re-running with the same ``--workdir`` resumes from the latest checkpoint. Writes
``metrics.jsonl``, ``samples/step_*.png`` and ``checkpoints/`` under the workdir.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections

from experiments._cli import parse_args, user_errors
from experiments._runner import base_config, train_denoiser


def get_config() -> ml_collections.ConfigDict:
    """A class-conditional tiny U-Net on the 8x8 digits; override anything from the CLI."""
    c = base_config()
    c.name = "train"
    c.model.num_classes = 10
    c.train.sample_every = 1000
    return c


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains (resuming if possible) and returns the :class:`~experiments._runner.Trained`."""
    return train_denoiser(config, workdir)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses ``argv``, trains; a bad config or data set ends with one line ``error: ...``."""
    config, workdir = parse_args(argv, "experiments.train", __doc__.splitlines()[0])
    with user_errors():
        trained = train_and_evaluate(config, workdir)
    print(f"trained {trained.steps_run} steps in {trained.seconds:.1f} s; "
          f"state at step {int(trained.state.step)}; outputs in {workdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
