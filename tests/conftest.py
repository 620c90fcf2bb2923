import pytest
import torch

from ondemand_seg import GeneratorConfig, MaskConfig
from ondemand_seg.pipelines.tiny import save_tiny_pipeline


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine every op of a
    two-thread run waits for a descheduled thread (a 1 s DC-AE decode takes 30 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A tiny random SD 1.x-layout pipeline folder (safetensors, model_index.json)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny random SD 2.x-layout pipeline folder (v-prediction, linear projections)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), "sd2")


@pytest.fixture
def fast():
    """Options that keep generation on the tiny model to milliseconds."""
    return dict(image_size=64, generator=GeneratorConfig(num_inference_steps=3, batch_size=4), mask=MaskConfig())
