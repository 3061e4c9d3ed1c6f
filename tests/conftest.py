import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CHECKOUT = __import__("pathlib").Path(__file__).resolve().parent.parent
STRAY_REPORT = CHECKOUT / "monoquant_report.md"  # the Lightning callback's report, if a Trainer logs into cwd


@pytest.fixture(autouse=True)
def _nothing_written_into_the_checkout():
    """Fail a test that leaves the Lightning callback's report in the checkout (its Trainer logged into the working
    directory: give it a ``default_root_dir``)."""
    existed = STRAY_REPORT.exists()
    yield
    if not existed and STRAY_REPORT.exists():
        STRAY_REPORT.unlink()
        pytest.fail(f"this test wrote {STRAY_REPORT.name} into the checkout; give its Trainer a default_root_dir")


@pytest.fixture(autouse=True)
def _kernel_environment_read_again(monkeypatch):
    """``MONOQUANT_KERNEL`` / ``MONOQUANT_TUNE`` are read once (``mq.kernels.reload_environment``): a test that sets
    them calls it, and after each test they are read again from the restored environment."""
    yield
    monkeypatch.undo()
    from monoquant import tuner

    tuner.reload_environment()


@pytest.fixture
def fresh_kernel_choices(monkeypatch):
    """No kernel pinned, tuning on, no choices file, and no measured choice from another test (before and after):
    for the modules that test the dispatch (``pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")``)."""
    from monoquant import tuner

    monkeypatch.delenv("MONOQUANT_KERNEL", raising=False)
    monkeypatch.delenv("MONOQUANT_TUNE", raising=False)
    monkeypatch.delenv("MONOQUANT_KERNEL_CACHE", raising=False)
    tuner.reload_environment()
    monkeypatch.setattr(tuner, "_FILE_LOADED", set())
    tuner.clear()
    yield
    tuner.clear()
