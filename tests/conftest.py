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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A user's folder of 5 ToyWorld images as files, ``tags.json`` beside them (keyed by file name):
    an RGB PNG, a grayscale one, an RGBA one, a JPEG of another size and a flat gray PNG (which the
    quality gate leaves out as a constant image)."""
    import json

    import numpy as np
    import PIL.Image

    from ondemand_seg.toyworld import ToyWorld

    folder = tmp_path_factory.mktemp("my_images")
    world = ToyWorld(32, seed=3)
    samples = [world.sample(i) for i in range(4)]
    images = {"a_rgb.png": PIL.Image.fromarray(samples[0].image),
              "b_gray.png": PIL.Image.fromarray(samples[1].image).convert("L"),
              "c_rgba.png": PIL.Image.fromarray(samples[2].image).convert("RGBA"),
              "d_tall.jpg": PIL.Image.fromarray(samples[3].image).resize((24, 40)),
              "e_flat.png": PIL.Image.fromarray(np.full((32, 32, 3), 128, np.uint8))}
    for name, image in images.items():
        image.save(folder / name)
    tags = {name: list(s.class_names) for name, s in zip(images, samples)}
    tags["e_flat.png"] = ["circle"]
    (folder / "tags.json").write_text(json.dumps(tags))
    return folder
