"""One process of tests/test_multiprocess.py: a few data-parallel train steps of a tiny MLP
denoiser on this process's shard of every global batch, then (with several processes) a
checkpoint saved and restored by all processes.

Run by path, one process per ``--process-id``, with ``XLA_FLAGS`` giving each process its fake CPU
devices (set by the test)::

    python tests/_multiprocess_worker.py OUT --num-processes 2 --process-id 0 --port P

``--num-processes 1`` is the single-process reference (no distributed runtime). Writes
``OUT/process_<id>.npz``: the data indices this process loaded per step, the global batch of the
first step as the mesh saw it, the final parameters (raveled), and with several processes the
checkpointed and restored state's leaves.
"""

from __future__ import annotations

import argparse
import os

GLOBAL_BATCH = 16
STEPS = 3
N_EXAMPLES = 64


def _host(x):
    """A fully replicated (or host) array as numpy, on any number of processes."""
    import jax
    import numpy as np

    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from dpm.training import initialize_distributed

    if args.num_processes > 1:
        initialize_distributed(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.flatten_util import ravel_pytree
    from jax.tree_util import Partial

    import dpm
    import nets
    import solvers
    from dpm.data import BatchIterator, toy_2d
    from dpm.training import (
        Checkpointer,
        fast_compile_options,
        init_train_state,
        jit_train_step,
        make_mesh,
        make_optimizer,
        make_train_step,
        process_batch_size,
        replicate,
        shard_batch,
        shard_state,
    )

    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.process_index() == args.process_id, jax.process_index()

    data = toy_2d("ring8", N_EXAMPLES, seed=0)
    data["id"] = np.arange(N_EXAMPLES, dtype=np.int32)  # which examples each process loaded
    it = BatchIterator(data, GLOBAL_BATCH, seed=0)  # this process's rows of each global batch
    assert it.local_batch_size == process_batch_size(GLOBAL_BATCH)

    graphdef, params = nets.init_params(nets.MLP, 2, 16, 1, seed=0)
    apply = lambda g, p, x, noise_level, cond: nnx.merge(g, p)(x, noise_level, cond)
    schedule = dpm.LinearVP()
    make_den = lambda p: dpm.network_denoiser(Partial(apply, graphdef, p), schedule, "eps")
    loss = dpm.denoising_loss(make_den, weighting="eps", time_sampler="uniform", t_min=1e-3)
    optimizer = make_optimizer(1e-2, total_steps=STEPS)
    params_0 = np.asarray(ravel_pytree(params)[0])
    mesh = make_mesh()
    state = replicate(init_train_state(params, optimizer, jax.random.key(0)), mesh)
    step = jit_train_step(make_train_step(loss, optimizer, ema_decay=0.9), mesh,
                          compiler_options=fast_compile_options())

    ids, global_x0, rep_or_fsdp = [], None, {}
    for i in range(STEPS):
        local = next(it)
        ids.append(local["id"])
        batch = shard_batch({"x": local["x"]}, mesh)
        if i == 0:  # the global batch as the train step sees it
            global_x0 = multihost_utils.process_allgather(batch["x"], tiled=True)
        state, _ = step(state, batch)

    # FSDP across processes: a wider MLP (layers of 64 x 64 > FSDP_MIN_SIZE elements) trained
    # on the same batches with its state split over all 4 devices ("fsdp" = 4: each process
    # holds half of every large leaf), and replicated
    graphdef64, params64 = nets.init_params(nets.MLP, 2, 64, 1, seed=1)
    make64 = lambda p: dpm.network_denoiser(Partial(apply, graphdef64, p), schedule, "eps")
    loss64 = dpm.denoising_loss(make64, weighting="eps", time_sampler="uniform", t_min=1e-3)
    opt64 = make_optimizer(1e-2, total_steps=STEPS, flatten=False)  # per-leaf moments
    for name, mesh64 in (("rep64", make_mesh()), ("fsdp64", make_mesh(fsdp=4))):
        fresh = jax.tree.map(np.array, params64)  # the step donates its state: a copy per run
        st = shard_state(init_train_state(fresh, opt64, jax.random.key(0)), mesh64)
        step64 = jit_train_step(make_train_step(loss64, opt64, ema_decay=0.9), mesh64,
                                compiler_options=fast_compile_options())
        it64 = BatchIterator(data, GLOBAL_BATCH, seed=0)
        for _ in range(STEPS):
            st, _ = step64(st, shard_batch({"x": next(it64)["x"]}, mesh64))
        if name == "fsdp64":
            assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(st.params))
        whole = multihost_utils.process_allgather(st.params, tiled=True)  # sharded leaves too
        rep_or_fsdp[name] = np.asarray(ravel_pytree(whole)[0])

    # sampling with the trained denoiser passed to the jitted sampler as an argument (its
    # schedule's cached device leaves are process-local arrays) on a batch sharded over both
    # processes: the program spans all devices
    den = make_den(state.ema_params)
    x_T = shard_batch(np.asarray(global_x0)[it.local_batch_size * args.process_id:][
        :it.local_batch_size], mesh)
    ts = solvers.grids.uniform_time(4, schedule, t_end=0.0)
    sample = multihost_utils.process_allgather(jax.jit(solvers.ddim)(den, x_T, ts), tiled=True)

    out = {
        "sample": np.asarray(sample),
        **rep_or_fsdp,
        "ids": np.stack(ids),
        "global_x0": np.asarray(global_x0),
        "params_0": params_0,
        "params": np.asarray(ravel_pytree(jax.tree.map(_host, state.params))[0]),
        "ema_params": np.asarray(ravel_pytree(jax.tree.map(_host, state.ema_params))[0]),
        "step": _host(state.step),
        "mesh_processes": np.array([d.process_index for d in mesh.devices.flat]),
    }

    if args.num_processes > 1:
        # every process saves and restores; the directory is shared
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        saved = [_host(x) for x in jax.tree.leaves(state)]
        directory, config = os.path.join(args.out, "ckpt"), {"model": "mlp"}
        with Checkpointer(directory, config=config) as ckpt:
            ckpt.save(STEPS, state, data_state=it.state())
        with Checkpointer(directory, config=config) as ckpt:  # as a resumed run would
            restored, data_state, restored_step = ckpt.restore_latest(abstract)
        assert restored_step == STEPS and data_state == it.state(), (restored_step, data_state)
        got = jax.tree.leaves(restored)
        assert all(r.sharding.is_equivalent_to(s.sharding, r.ndim)
                   for r, s in zip(got, jax.tree.leaves(state), strict=True))
        out.update({f"saved_{i}": x for i, x in enumerate(saved)})
        out.update({f"restored_{i}": _host(x) for i, x in enumerate(got)})

    np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), **out)


if __name__ == "__main__":
    main()
