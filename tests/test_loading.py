import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import ondemand_seg
import ondemand_seg.pipelines.builtin as builtin
from ondemand_seg.pipelines.builtin import (
    PRESET_FILE,
    RANDOM_WEIGHTS_MODEL,
    TOY_MODEL,
    TOY_MODEL_DIR,
    read_preset,
    resolve_model,
)
from ondemand_seg.pipelines.devices import pick_device
from ondemand_seg.pipelines.loading import check_model_source, load_pipeline
from ondemand_seg.pipelines.tiny import TINY_IMAGE_SIZE
from ondemand_seg.settings.validation import check_image_size

PACKAGE_DIR = Path(ondemand_seg.__file__).resolve().parent


def test_folder_pipelines_load_in_fp32_without_safety_checker(tiny_sd1, tiny_sd2):
    for folder in (tiny_sd1, tiny_sd2):
        pipeline = load_pipeline(folder, torch.device("cpu"))
        assert pipeline.unet.dtype == torch.float32 and pipeline.vae.dtype == torch.float32
        assert pipeline.safety_checker is None
        assert pipeline.unet.device.type == "cpu"


def test_random_weights_model_loads_without_files():
    pipeline = load_pipeline(RANDOM_WEIGHTS_MODEL, torch.device("cpu"))
    assert pipeline.unet.dtype == torch.float32 and pipeline.safety_checker is None
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == TINY_IMAGE_SIZE


def test_scheduler_is_swappable(tiny_sd1):
    pipeline = load_pipeline(tiny_sd1, torch.device("cpu"), scheduler="DPMSolverMultistepScheduler")
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        load_pipeline(tiny_sd1, torch.device("cpu"), scheduler="NoSuchScheduler")


def test_callable_model_is_called_once(tiny_sd1):
    calls = []

    def make():
        calls.append(1)
        return load_pipeline(tiny_sd1, torch.device("cpu"))

    pipeline = load_pipeline(make, torch.device("cpu"))
    assert calls == [1] and pipeline.unet.dtype == torch.float32


def test_unloadable_folder_is_a_runtime_error_naming_it(tmp_path, tiny_sd1):
    folder = shutil.copytree(tiny_sd1, tmp_path / "broken")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="could not load a Stable Diffusion 1.x/2.x pipeline from .*broken"):
        load_pipeline(folder, torch.device("cpu"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="broken/model_index.json names no vae, text_encoder, tokenizer, unet, "
                                         "scheduler: a StableDiffusionPipeline needs them"):
        load_pipeline(folder, torch.device("cpu"))


def ours(caught):
    return [w for w in caught if Path(w.filename).resolve().is_relative_to(PACKAGE_DIR)]


@pytest.mark.parametrize("model", [TOY_MODEL, "tiny_sd1"])
def test_load_pipeline_raises_no_warning_of_ours(model, request):
    if model == "tiny_sd1":
        model = request.getfixturevalue("tiny_sd1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(model, torch.device("cpu"))
    listed = "\n".join(f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught)
    dtype_warnings = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                      and "torch_dtype" in str(w.message)]
    assert not dtype_warnings, f"the pinned diffusers deprecates the loading argument we pass:\n{listed}"
    assert not ours(caught), f"warnings raised from ondemand_seg while loading:\n{listed}"


def test_resolve_model_maps_only_the_toy_name():
    assert resolve_model(TOY_MODEL) == TOY_MODEL_DIR
    assert (TOY_MODEL_DIR / "model_index.json").is_file()
    assert resolve_model("org/name") == "org/name"
    assert resolve_model(RANDOM_WEIGHTS_MODEL) == RANDOM_WEIGHTS_MODEL


def test_missing_toy_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "toy", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="embedded 'toy' model is missing.*train_toy_model.py"):
        resolve_model(TOY_MODEL)


def test_read_preset(tmp_path):
    toy = read_preset(TOY_MODEL)
    assert toy == json.loads((TOY_MODEL_DIR / PRESET_FILE).read_text())
    assert read_preset(RANDOM_WEIGHTS_MODEL) == {"image_size": TINY_IMAGE_SIZE}
    assert read_preset(lambda: None) == {}
    assert read_preset("org/name") == {}
    assert read_preset(tmp_path) == {}, "a folder without a preset has none"
    (tmp_path / PRESET_FILE).write_text('{"image_size": ')
    with pytest.raises(ValueError, match=f"{PRESET_FILE} is not valid JSON"):
        read_preset(tmp_path)
    (tmp_path / PRESET_FILE).write_text("[32]")
    with pytest.raises(ValueError, match="must hold a JSON object of settings, got list"):
        read_preset(str(tmp_path))


def test_check_model_source(tmp_path, tiny_sd1, monkeypatch):
    from huggingface_hub import constants

    spec = check_model_source(tiny_sd1)
    assert spec.family.name == "sd" and spec.vae_factor == 8 and spec.text_factors == (1, 2, 4)
    # Known only once loaded: no spec, and no error.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert check_model_source("runwayml/stable-diffusion-v1-5") is None  # not in the local cache
    assert check_model_source(RANDOM_WEIGHTS_MODEL) is None
    assert check_model_source(lambda: None) is None
    toy_vae = json.loads((TOY_MODEL_DIR / "vae" / "config.json").read_text())
    assert check_model_source(TOY_MODEL).vae_factor == 2 ** (len(toy_vae["block_out_channels"]) - 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_source(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="no model_index.json"):
        check_model_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        check_model_source(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        check_model_source(3)
    from ondemand_seg.pipelines.families import describe, folder_reader

    read = folder_reader(tiny_sd1)
    five_levels = describe(lambda name: {"block_out_channels": [1] * 5} if name == "vae/config.json" else read(name))
    assert five_levels.vae_factor == 16


def test_folders_naming_no_supported_pipeline_fail_early(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="names no pipeline class"):
        check_model_source(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="cannot capture text attention from a KandinskyV22Pipeline; supported "
                                         "pipelines: Stable Diffusion 1.x/2.x .*FluxPipeline"):
        check_model_source(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="model_index.json names no vae, unet, scheduler: a StableDiffusionXLPipeline"):
        check_model_source(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json is not valid JSON"):
        check_model_source(tmp_path)


def test_check_image_size():
    assert check_image_size(512) == (512, 512)
    assert check_image_size((512, 768)) == (512, 768)
    with pytest.raises(ValueError, match="positive ints"):
        check_image_size(-8)
    with pytest.raises(ValueError, match="positive ints"):
        check_image_size((64, 64, 64))
    with pytest.raises(ValueError, match="positive ints"):
        check_image_size(True)
    # 2 px per latent cell and one cell per attention token, but StableDiffusionPipeline.check_inputs
    # takes multiples of 8 whatever the VAE.
    toy = check_model_source(TOY_MODEL)
    assert check_image_size(40, toy) == (40, 40)
    for side in (12, 30, 34):
        with pytest.raises(ValueError, match=rf"image_size \({side}, {side}\) is not a multiple of 8 on each side .*"
                                             "StableDiffusionPipeline takes multiples of 8"):
            check_image_size(side, toy)


def test_pick_device_round_robin_or_cpu():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None, slot=3) == torch.device("cpu")
    else:
        assert pick_device(None, slot=3).index == 3 % torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipelines_are_fp16(tiny_sd1):
    from ondemand_seg import GeneratorConfig, MaskConfig
    from ondemand_seg.generation.generator import CapturingPipeline
    from ondemand_seg.settings.vocabulary import PromptSpec

    pipeline = load_pipeline(tiny_sd1, torch.device("cuda"))
    assert pipeline.unet.dtype == torch.float16 and pipeline.unet.device.type == "cuda"
    dog = PromptSpec("a photograph of a dog", ("dog",), (12,), ("dog",))
    batch = CapturingPipeline(pipeline, MaskConfig(), GeneratorConfig(num_inference_steps=3)).generate([dog], [0], (64, 64))
    assert batch.images.device.type == "cpu" and torch.isfinite(batch.images).all()


def test_two_threads_load_one_at_a_time_and_later_loads_keep_their_weights(tiny_sd1, monkeypatch):
    # Loading builds modules under process-wide patches (accelerate's init_empty_weights): two
    # threads loading at once left every later module on the meta device.
    import threading
    import time

    from diffusers import DiffusionPipeline

    original, active, most = DiffusionPipeline.from_pretrained, [0], [0]

    def tracked(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.2)
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", tracked)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(load_pipeline(tiny_sd1, torch.device("cpu"))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 2 and most[0] == 1, "the two loads overlapped"
    later = load_pipeline(tiny_sd1, torch.device("cpu"))
    assert not any(p.is_meta for p in later.unet.parameters())
