"""experiments.bench_vs_torch: its JAX side and its U-Net translation run without torch (CI has
none); the side-by-side run itself only where torch and diffusers are installed."""

import re
import sys

import jax
import numpy as np
import pytest

import dpm
import nets
from experiments import bench_vs_torch
from solvers import grids

HINT = re.escape('pip install -e ".[compare]"')


@pytest.fixture
def no_torch(monkeypatch):
    """``import torch`` / ``import diffusers`` fail, installed or not."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "diffusers", None)


def test_without_torch_the_benchmark_says_how_to_install_it(no_torch, tmp_path):
    with pytest.raises(ImportError, match=HINT):
        bench_vs_torch.require_torch()
    with pytest.raises(ImportError, match=HINT):
        bench_vs_torch.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_jax_side_of_section_b_runs_without_torch(no_torch):
    jx = bench_vs_torch.jax_section_b([3], batch=4)
    assert set(jx["cells"]) == {("ddim", 3), ("dpm_solver_pp_2M", 3)}
    for cell in jx["cells"].values():
        assert cell["x0"].shape == (4, 2) and np.all(np.isfinite(cell["x0"]))
        # the traced-arguments and the closed-over variants compute the same samples
        outs = [np.asarray(fn()) for fn in cell["fns"].values()]
        np.testing.assert_allclose(outs[0], cell["x0"], rtol=0, atol=0)
        np.testing.assert_allclose(outs[1], cell["x0"], rtol=1e-5, atol=1e-5)


def test_ddpm_cifar10_translates_to_diffusers_published_ddpm_config():
    # google/ddpm-cifar10-32's UNet2DModel config (attention_head_dim None there = the width,
    # 256: one head, as DDPM's num_heads=1 here)
    kw = bench_vs_torch.diffusers_unet_kwargs(nets.ddpm_cifar10())
    assert kw["block_out_channels"] == (128, 256, 256, 256) and kw["layers_per_block"] == 2
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                      "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert kw["attention_head_dim"] == 256 and kw["dropout"] == 0.1
    assert (kw["freq_shift"], kw["flip_sin_to_cos"], kw["downsample_padding"]) == (1, False, 0)
    assert kw["norm_eps"] == 1e-6 and kw["norm_num_groups"] == 32
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        bench_vs_torch.diffusers_unet_kwargs(nets.ddpm_cifar10(use_scale_shift_norm=True))


def test_state_dict_translation_keeps_every_parameter():
    cfg = bench_vs_torch.unet_config("tiny")
    _, params = nets.init_params(nets.UNet, cfg, seed=0)
    sd = bench_vs_torch.torch_state_dict(params)
    assert sum(a.size for a in sd.values()) == sum(p.size for p in jax.tree.leaves(params))
    leftover = [k for k in sd if re.search(r"kernel|scale|qkv|\bblocks\b|attns|emb_\d|mid_res", k)]
    assert leftover == []
    assert sd["conv_in.weight"].shape == (32, 3, 3, 3)  # (out, in, kh, kw)
    assert sd["mid_block.attentions.0.to_k.weight"].shape == (64, 64)
    assert sd["time_embedding.linear_1.weight"].shape == (128, 32)  # (out, in)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_trailing_grid_is_diffusers_trailing_spacing(steps):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    ts = np.asarray(grids.trailing(steps, dpm.DiscreteVP.from_name("linear")), np.float64)
    assert ts[-1] == 0.0  # then t = 0: final_sigmas_type="zero", set_alpha_to_one=True
    for scheduler in (bench_vs_torch.dpm_scheduler(), bench_vs_torch.ddim_scheduler()):
        scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(np.round(ts[:-1] * 1000 - 1), scheduler.timesteps.numpy())


# third-party warnings (diffusers' schedulers hand torch tensors to numpy 2)
@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
@pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")
def test_side_by_side_smoke(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    r = bench_vs_torch.main(["--steps", "4", "--repeats", "1", "--sample-batch", "8",
                             "--train-batch", "8", "--nfe", "3", "--min-time", "0",
                             "--dtype", "bfloat16", "--out", str(tmp_path)])
    c = r["section_a"]["check"]
    assert c["params_project"] == c["params_diffusers"] == 702_499
    assert c["forward_max_abs_diff"] < 1e-4 * max(1.0, c["forward_max_abs"])
    rows = r["section_a"]["rows"]  # float32 always, bfloat16 on request
    assert [(row["dtype"], row["framework"]) for row in rows] == 2 * [
        ("float32", "project (JAX)"), ("float32", "torch eager")] + 2 * [
        ("bfloat16", "project (JAX)"), ("bfloat16", "torch eager")]
    assert all(row["images_per_s"] > 0 and row["error"] is None for row in rows)
    assert [(row["solver"], row["steps"]) for row in r["section_b"]] == [
        ("ddim", 4), ("dpm_solver_pp_2M", 4)]
    assert all(row["max_abs_diff"] < 1e-4 for row in r["section_b"])
    assert len(list(tmp_path.glob("bench_vs_torch_tiny_bfloat16_*.json"))) == 1
