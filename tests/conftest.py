"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""

import os
import types

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's workers and the subprocesses they start
# (programs compiled by several tests, or by both workers, compile once); kept between runs in
# .pytest_cache (a fresh clone, as in CI, starts cold). Bounded and locked (filelock).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test body in float64 (where accuracy is asserted)."""
    with jax.enable_x64(True):
        yield


# Zoo models and judges of the experiments' smoke tests, trained once per test session: every
# smoke run then restores them (its zoo and judge step counts set to ``smoke_zoo.steps``)
# instead of training its own.
SMOKE_ZOO_STEPS = 2


def _build_once(shared, name, build, *, block):
    """Runs ``build()`` unless ``shared/name.complete`` exists, under the lock ``shared/name.lock``
    (one builder across processes). Returns False when ``block`` is False and another process
    holds the lock."""
    import fcntl

    done = shared / f"{name}.complete"
    if done.exists():
        return True
    with open(shared / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        try:
            if not done.exists():
                build()
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True


@pytest.fixture(scope="session")
def smoke_zoo(tmp_path_factory):
    """The root of a zoo shared by the whole session (both pytest-xdist workers: built in the
    directory above the workers' temporary roots) holding the eps and EDM 8x8 digits models and
    the judges, each trained for ``SMOKE_ZOO_STEPS`` steps. Each part is built once, under its
    own file lock; a worker first builds the parts nobody else is building, then waits.

    Returns:
      a namespace with ``root`` (the zoo root) and ``steps`` (the models' and judges' steps).
    """
    from experiments._zoo import digits_config, digits_data, digits_model, judges

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = str(shared / "smoke_zoo")

    def model(kind):
        zc = digits_config(kind, 8, train_steps=SMOKE_ZOO_STEPS, fast_compile=True)
        return lambda: digits_model(zc, root, progress=False)

    def judge_pair():
        train, test = digits_data(digits_config("eps", 8))
        judges(train, root, test, steps=SMOKE_ZOO_STEPS)

    parts = {"smoke_zoo_eps": model("eps"), "smoke_zoo_edm": model("edm"),
             "smoke_zoo_judges": judge_pair}
    pending = [n for n, b in parts.items() if not _build_once(shared, n, b, block=False)]
    for n in pending:
        _build_once(shared, n, parts[n], block=True)
    return types.SimpleNamespace(root=root, steps=SMOKE_ZOO_STEPS)
