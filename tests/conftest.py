import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs one worker per core: each worker, and each run it starts in a subprocess,
# computes on one thread instead of all of them competing for every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def embedded_corpus() -> dict[str, list[str]]:
    """The embedded corpus's shards in the cache, where every run reads them: built once, by the
    first worker that needs them (the others wait on its lock). tests/test_corpus.py tests the build."""
    from lm_opt.corpus import build_corpus, default_cache_dir

    return build_corpus(default_cache_dir() / "corpus")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, where torch sees no CUDA device (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# What the math libraries were held to (.ci/as-kind): runs compare bit for bit only on one kind.
HELD = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE",
        "NPY_DISABLE_CPU_FEATURES")


def pytest_terminal_summary(terminalreporter) -> None:
    """The CPU kind the suite computed as, in lm_opt.precision's terms (without importing Lightning)."""
    import torch

    native = "native" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    held = " ".join(f"{k}={os.environ[k]}" for k in HELD if k in os.environ) or "nothing held (.ci/as-kind)"
    terminalreporter.write_line(f"cpu: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {native}; {held}")
