"""Command-line handling shared by the experiments: ``ml_collections.config_flags`` on absl flags,
the convention of JAX research code.

    python -m experiments.train [--config MODULE_OR_FILE.py] [--workdir DIR] \\
        [--config.key.path=value ...]

``--config`` names a module (``experiments.train``) or a ``.py`` file defining ``get_config()``;
``--config.a.b=value`` overrides a field, parsed by ``config_flags`` with the field's type (ints,
floats, bools, strings, tuples as ``'(1, 2)'``). Two things the flags library does not do are done
here before it parses: a field holding None (an optional setting such as
``model.num_classes``) and a field set to ``None`` on the command line take Python literals; and a
``kwargs`` dict (keyword arguments of a data source, e.g. ``data.kwargs``) takes new keys, since
which keys it needs depends on the source (``--config.data.kwargs.path=...``). Any other unknown
key is an error. Parsing uses its own ``absl.flags.FlagValues``, so that several experiments can
parse in one process (tests, notebooks) without clashing over the global flags.

A mistake on the command line (:class:`UsageError`) or in the config (any ``ValueError`` raised by
the config's validation) ends :func:`parse_args` with one line ``error: ...`` on stderr and exit
status 2, as ``argparse`` does.

Before parsing, :func:`parse_args` turns on JAX's persistent compilation cache
(:func:`use_compilation_cache`) and joins a multi-host run
(:func:`dpm.training.initialize_distributed`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from dpm.training import initialize_distributed

# Types config_flags parses by itself; other fields (None, lists, ...) are parsed as literals.
_FLAG_TYPES = (bool, int, float, str, tuple, ml_collections.ConfigDict, object)
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$", re.DOTALL)


class UsageError(ValueError):
    """A mistake on the command line: unknown key or flag, bad value, missing config."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec``: a module name (``experiments.quickstart``) or a ``.py`` file that
    defines ``get_config()``.

    Raises:
      UsageError: the module or file does not exist, or defines no ``get_config()``.
    """
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise UsageError(f"--config: file {spec!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location("_dpm_config", spec)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name is None or not spec.startswith(e.name):
                raise  # the config module itself failed to import something
            raise UsageError(
                f"--config: no module {spec!r}; expected a module name such as "
                "experiments.train or a path to a .py file"
            ) from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config: {spec!r} defines no get_config()")
    return module.get_config()


def _node(config: ml_collections.ConfigDict, path: str):
    """(parent ConfigDict, leaf name) of a dotted path, or a UsageError naming the unknown key."""
    *parents, leaf = path.split(".")
    node, walked = config, []
    for p in parents:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise UsageError(_unknown(path, ".".join(walked), node, p))
        node = node[p]
        walked.append(p)
    if not isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"unknown config key {path!r}: {'.'.join(walked)!r} is not a dict")
    return node, leaf, parents


def _unknown(path: str, where: str, node, key: str) -> str:
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown config key {path!r}: {where or 'config'!r} has no {key!r}{hint} "
            f"(known: {', '.join(known)})")


def _join_values(argv: Sequence[str]) -> list[str]:
    """``--config.key value`` -> ``--config.key=value`` (literal-typed fields take no separate
    value in config_flags)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        m = _OVERRIDE.match(arg)
        if (m is not None and m.group(2) is None and not arg.startswith(("-no", "--no"))
                and i + 1 < len(argv) and not argv[i + 1].startswith("-")):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        out.append(arg)
        i += 1
    return out


def _prepare_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Checks every ``--config.key`` of ``argv`` names a field, adds new keys of ``kwargs`` dicts
    and makes None-able fields literal-typed, so that config_flags can parse them."""
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if m is None:
            continue
        path, text = m.group(1), m.group(2)
        node, leaf, parents = _node(config, path)
        if leaf not in node:
            if not parents or parents[-1] != "kwargs":
                raise UsageError(_unknown(path, ".".join(parents), node, leaf))
            with node.unlocked():
                node[leaf] = config_dict.placeholder(object)  # a new keyword argument
            continue
        kind = node.get_type(leaf)
        if kind not in _FLAG_TYPES or (text is not None and text.strip() == "None"):
            value = node[leaf]
            with node.unlocked():
                del node[leaf]  # the field's type changes to "any literal"
                node[leaf] = config_dict.FieldReference(value, field_type=object)


def _split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the value of the last ``--config X`` / ``--config=X``, argv without it)."""
    spec, rest, i = None, [], 0
    while i < len(argv):
        m = _CONFIG_FLAG.match(argv[i])
        if m is None:
            rest.append(argv[i])
        elif m.group(1) is not None:
            spec = m.group(1)
        elif i + 1 < len(argv):
            spec, i = argv[i + 1], i + 1
        else:
            raise UsageError("--config needs a value: a module name or a .py file")
        i += 1
    return spec, rest


def _parse_flags(
    config: ml_collections.ConfigDict, argv: Sequence[str], extra_flags: bool = True
) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
    """Applies the ``--config.key=value`` flags of ``argv`` to ``config`` with config_flags."""
    argv = _join_values(argv)
    _prepare_overrides(config, argv)
    full = ["prog", *argv]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=fv, sys_argv=full)
        if extra_flags:
            flags.DEFINE_string("workdir", None, "output and checkpoint directory",
                                flag_values=fv)
        rest = fv(full)
    except flags.Error as e:
        raise UsageError(_one_line(str(e))) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected argument {rest[1]!r}; overrides look like "
                         "--config.key=value")
    config = fv.config
    config.unlock()
    return config, fv


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies ``key.path=value`` overrides, as ``--config.key.path=value`` would on the command
    line (typed by the field they replace; the last of repeated keys wins).

    Raises:
      UsageError: an unknown key, or a value the field's type cannot parse.
    """
    argv = []
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override must look like key.path=value; got {item!r}")
        argv.append("--config." + item.removeprefix("--").removeprefix("config."))
    return _parse_flags(config, argv, extra_flags=False)[0]


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _has_training_sections(config: ml_collections.ConfigDict) -> bool:
    return all(k in config for k in ("data", "model", "diffusion", "optim", "train"))


def parse_config_args(
    argv: Sequence[str] | None,
    default_config: str,
    *,
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[ml_collections.ConfigDict, str]:
    """``[--config MODULE_OR_FILE] [--workdir DIR] [--config.key=value ...]`` -> (config,
    workdir); raises instead of exiting (see :func:`parse_args`).

    Raises:
      UsageError: a mistake on the command line, or the ``ValueError`` of ``validate`` (by
        default ``experiments._runner.validate_config`` for configs with the sections of
        ``base_config()``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    spec, rest = _split_config_flag(argv)
    config = load_config(spec or default_config)
    config, fv = _parse_flags(config, rest)
    if validate is None and _has_training_sections(config):
        from experiments._runner import validate_config as validate
    if validate is not None:
        try:
            validate(config)
        except ValueError as e:
            raise UsageError(str(e)) from e
    workdir = fv.workdir or os.path.join("runs", config.get("name", "run"))
    return config, workdir


def _usage(description: str, default_config: str) -> str:
    return (f"{description}\n\nusage: python -m {default_config} [--config MODULE_OR_FILE.py] "
            "[--workdir DIR] [--config.key=value ...]\n\n"
            f"--config   module or .py file with get_config() (default: {default_config})\n"
            "--workdir  output and checkpoint directory (default: runs/<config.name>)\n"
            "--config.key.path=value  overrides one field of the config; the default config:\n")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a :class:`UsageError`, an ``experiments._runner.ConfigError`` (a bad config or
    data set found during a run) or a :class:`dpm.training.WorkdirBusyError` (another process
    writes the workdir) raised inside the block into one line ``error: ...`` on stderr and
    ``SystemExit(2)``; other exceptions pass through with their traceback."""
    from dpm.training import WorkdirBusyError
    from experiments._runner import ConfigError

    try:
        yield
    except (UsageError, ConfigError, WorkdirBusyError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None


CACHE_ENV = "DPM_COMPILATION_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "dpm", "xla")
CACHE_MAX_BYTES = 4 * 2**30


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its directory.

    A command run again (a resumed run, a re-run report, the next paper reusing a zoo model's
    step) then loads its compiled programs instead of compiling them: the ``tiny`` U-Net's train
    step's first call drops from 12 s to under 3 s on a 2-core CPU. Programs that compile in
    under a second are not stored; the directory is kept under 4 GiB (least recently used
    entries go first). The directory is ``$DPM_COMPILATION_CACHE`` (default
    ``~/.cache/dpm/xla``; ``off`` turns the cache off); a cache already chosen with JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` or ``jax.config`` is left as it is.
    """
    import jax

    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    where = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
    if where.strip().lower() in ("off", "0", "none", ""):
        return None
    where = os.path.abspath(os.path.expanduser(where))
    jax.config.update("jax_compilation_cache_dir", where)
    try:  # JAX bounds (and locks) the cache with filelock, an [experiments] dependency
        import filelock  # noqa: F401
    except ImportError:
        pass
    else:
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return where


def parse_args(
    argv: Sequence[str] | None,
    default_config: str,
    description: str,
    *,
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[ml_collections.ConfigDict, str]:
    """``--config MODULE_OR_FILE --workdir DIR [--config.key=value ...]`` -> (config, workdir).

    ``-h`` / ``--help`` prints the usage and the default config, then exits 0. A mistake on the
    command line or in the config prints one line ``error: ...`` to stderr and exits with status 2.

    Args:
      argv: the arguments (without the program name); None reads ``sys.argv[1:]``.
      default_config: the module whose ``get_config()`` is used without ``--config``.
      description: one line shown by ``--help``.
      validate: checks the config and raises ``ValueError`` naming the bad field; by default
        ``experiments._runner.validate_config`` for configs with the sections of
        ``base_config()`` (data, model, diffusion, optim, train), nothing for others.

    Returns:
      ``(config, workdir)``, the workdir defaulting to ``runs/<config.name>``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        spec, _ = _split_config_flag([a for a in args if a not in ("-h", "--help")])
        print(_usage(description, default_config) + str(load_config(spec or default_config)))
        raise SystemExit(0)
    # A run launched as one of several processes (a TPU pod slice, Slurm, Open MPI, or
    # JAX_COORDINATOR_ADDRESS) joins the others before any JAX call (the config's validation
    # counts devices); a single process goes on as it is.
    use_compilation_cache()
    if initialize_distributed():
        import jax

        print(f"multi-host run: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices here", flush=True)
    try:
        return parse_config_args(args, default_config, validate=validate)
    except UsageError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None


def run_experiment(
    argv: Sequence[str] | None,
    default_config: str,
    description: str,
    train_and_evaluate: Callable[[ml_collections.ConfigDict, str], dict],
    *,
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
    summary: Callable[[dict], Sequence[str]] | None = None,
) -> dict:
    """The ``main`` of a paper experiment: parses ``argv`` (:func:`parse_args`), runs
    ``train_and_evaluate(config, workdir)`` holding the workdir's lock (one writer per run;
    a bad config or a busy workdir is one line ``error: ...``, :func:`user_errors`), prints
    ``summary(report)`` (default: its ``"verdict"`` lines) and where the report is. Returns the
    report."""
    import jax

    from dpm.training import WorkdirLock

    config, workdir = parse_args(argv, default_config, description, validate=validate)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with user_errors(), lock:
        report = train_and_evaluate(config, workdir)
    lines = summary(report) if summary is not None else report.get("verdict", [])
    if lines:
        print("\n".join(lines))
    secs = report.get("seconds")
    took = f" ({secs:.0f} s)" if isinstance(secs, int | float) else ""
    print(f"report: {os.path.join(workdir, 'report.md')}{took}")
    return report

