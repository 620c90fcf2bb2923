import pytest

from ondemand_seg import MaskConfig, SamplerConfig
from ondemand_seg.testing import save_tiny_pipeline


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
    return dict(image_size=64, sampler=SamplerConfig(num_inference_steps=3, batch_size=4), mask=MaskConfig())
