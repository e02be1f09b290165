"""The overhead benchmark runs, and what it reports that is not a timing holds: every call
variant passes the transfer guard, and a sampler's temporary memory does not grow with its
number of steps (a trajectory, asked for, does)."""

import json

from experiments import bench_overhead


def test_bench_overhead_smoke(tmp_path):
    r = bench_overhead.main(["--image-size", "8", "--channels", "1", "--batch", "4",
                             "--compile-steps", "4", "40", "--iters", "4", "--repeats", "1",
                             "--samplers", "ddim", "edm_heun",
                             "--out", str(tmp_path)])
    calls = r["call_overhead"]
    assert len(calls) == 6 and all(c["us_per_call"] > 0 for c in calls)
    # no host -> device copy when the README's call is repeated (schedule tables on device)
    assert all(c["transfer_guard_passes"] for c in calls), calls
    nfe = {row["sampler"]: row["nfe"] for row in r["sampler_overhead"]}
    assert nfe == {"ddim": 10, "edm_heun": 19}
    for row in r["compile_and_memory"]:
        # one scan body whatever the number of steps: without a trajectory only the per-step
        # coefficients (a few scalars a step) grow, far below one state a step
        assert 0 <= row["temp_bytes_per_step"] < 0.1 * row["state_bytes"], row
        with_traj = row["temp_bytes_40_trajectory"] + row["output_bytes_40_trajectory"]
        assert with_traj > row["temp_bytes_40"] + row["output_bytes_40"], row
    with open(tmp_path / f"bench_overhead_{r['backend']}.json") as f:
        assert json.load(f)["forward_us"] == r["forward_us"]
