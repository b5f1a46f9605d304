import os
import shutil
import tempfile

import pytest
import torch

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.testing.numerics import child_environment, numerics_state, use_test_numerics
from megatron_cosmos3.testing.shared_cache import SHARED_DIR_ENV
from megatron_cosmos3.testing.training import tiny_mot_config


def pytest_configure(config):
    # Every process of the session (the controller, each xdist worker) computes under the tests'
    # numerics from the start: a module- or session-scoped fixture is set up before the first test's
    # autouse ``test_numerics``, so the first module fixture of a process (a reference training run)
    # ran at torch's default thread count and its losses differed in the last bits from the same run
    # inside a test (test_train_on_shards's straight run, when its test came first on a worker).
    use_test_numerics()
    # Children that a test starts without naming an environment get the same thread count too.
    os.environ.update(child_environment({}))
    # One folder of shared test artifacts for the session (testing/shared_cache.py), made by the
    # controller before the xdist workers start: they inherit the variable.
    if not hasattr(config, "workerinput") and SHARED_DIR_ENV not in os.environ:
        config._cosmos3_shared_dir = os.environ[SHARED_DIR_ENV] = tempfile.mkdtemp(prefix="cosmos3-test-shared-")


def pytest_unconfigure(config):
    shared = getattr(config, "_cosmos3_shared_dir", None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        del os.environ[SHARED_DIR_ENV]


@pytest.fixture(autouse=True)
def test_numerics():
    """Every test computes under the same numerical settings as the processes it compares with, and
    leaves them as it found them: a test that changes them fails here, whatever order tests run in."""
    use_test_numerics()
    before = numerics_state()
    yield
    after = numerics_state()
    use_test_numerics()
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    assert not changed, f"the test left torch's numerical settings changed (before, after): {changed}"


@pytest.fixture
def tiny_config() -> MoTConfig:
    """A two-layer MoT small enough for exact fp32 comparisons in milliseconds."""
    return tiny_mot_config()


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` start first, spread over the xdist workers: the test command's
    ``--dist worksteal`` hands each worker one contiguous slice of this order and steals from the
    slices' ends, so a slow test left at the end of a slice would run alone at the end of the suite.
    Slow tests go to the fronts of the slices in turn, those sharing a module fixture (e.g. a SLURM
    cluster, started once per worker) together; the other tests keep their order."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    slow: dict[str, list] = {}
    for item in items:
        if item.get_closest_marker("slow") is not None:
            definitions = getattr(item, "_fixtureinfo", None)
            scopes = {d.scope for defs in definitions.name2fixturedefs.values() for d in defs} if definitions else ()
            slow.setdefault(item.module.__name__ if "module" in scopes else item.nodeid, []).append(item)
    if not slow:
        return
    chosen = {id(item) for module in slow.values() for item in module}
    rest = [item for item in items if id(item) not in chosen]
    # The slices worksteal's first schedule cuts: each worker in turn takes remaining // workers_left.
    sizes, remaining = [], len(items)
    for left in range(workers, 0, -1):
        sizes.append(remaining // left)
        remaining -= sizes[-1]
    fronts: list[list] = [[] for _ in range(workers)]
    for group in sorted(slow.values(), key=len, reverse=True):
        fronts[min(range(workers), key=lambda w: len(fronts[w]))].extend(group)
    order = []
    for front, size in zip(fronts, sizes):
        order += front
        take = max(0, size - len(front))
        order += rest[:take]
        del rest[:take]
    items[:] = order + rest


@pytest.fixture
def ended_run_partial_folder():
    """Makes ``atomic_files.partial_folder(folder)`` as a process of this host that has since ended
    left it (a SIGKILLed run's leftover); returns its path."""
    import subprocess

    from megatron_cosmos3.atomic_files import partial_folder

    def make(folder):
        ended = subprocess.Popen(["true"])
        ended.wait()
        made = partial_folder(folder)
        return made.rename(made.with_name(made.name.replace(f"-{os.getpid()}.", f"-{ended.pid}.")))

    return make
