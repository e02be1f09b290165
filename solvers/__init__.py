"""Samplers: one pure function per method, ``sampler(denoiser, x_T, ts, *, key, **options)``,
each one ``lax.scan`` over a time grid made outside it (:mod:`solvers.grids`)."""

from solvers import grids
from solvers.bdia import BDIAPair, bdia_ddim, bdia_edm, bdia_edm_invert, bdia_invert
from solvers.ddgan import ddgan, ddgan_grid
from solvers.ddim import ddim, ddim_invert
from solvers.ddpm import ddpm
from solvers.diffusevae import diffusevae_sample
from solvers.dpm_solver import dpm_solver, dpm_solver_fast_orders, dpm_solver_pp
from solvers.edm import edm_euler, edm_heun, edm_stochastic
from solvers.inpaint import inpaint, paste_back
from solvers.lcm import lcm, lcm_grid, lcm_timesteps
from solvers.pndm import pndm
from solvers.progressive import pd_stochastic
from solvers.time_shift import TimeShift, select_shifted_time, time_shift

__all__ = [
    "grids",
    "BDIAPair",
    "TimeShift",
    "bdia_ddim",
    "bdia_edm",
    "bdia_edm_invert",
    "bdia_invert",
    "ddgan",
    "ddgan_grid",
    "ddim",
    "ddim_invert",
    "ddpm",
    "diffusevae_sample",
    "dpm_solver",
    "dpm_solver_fast_orders",
    "dpm_solver_pp",
    "edm_euler",
    "edm_heun",
    "edm_stochastic",
    "inpaint",
    "lcm",
    "lcm_grid",
    "lcm_timesteps",
    "paste_back",
    "pd_stochastic",
    "pndm",
    "select_shifted_time",
    "time_shift",
]
