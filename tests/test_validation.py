"""Bad input fails at construction, in the main process, with an error naming the value: one table
of bad values (and one of broken model folders), each raised before any pipeline loads."""
import contextlib
import json
import math
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

import ondemand_seg.generation.generator as source
from ondemand_seg import DiffuMaskDataset, DiffuMaskStream
from ondemand_seg.pipelines.builtin import PRESET_FILE, TOY_MODEL
from ondemand_seg.pipelines.devices import check_device
from ondemand_seg.pipelines.folder import check_safetensors
from ondemand_seg.pipelines.loading import check_model_source
from ondemand_seg.settings.validation import check_finite, check_int

STREAM_ONLY = {"reuse", "num_samples"}
DATASET_ONLY = {"length"}

# (override of DiffuMaskStream("toy", ["circle"]) / DiffuMaskDataset("toy", ["circle"], length=4),
#  the exception, the message it must carry). The toy model is a StableDiffusionPipeline with a
# 2x VAE, guided by classifier-free guidance.
BAD_VALUES = [
    # image size: types, range, and the pipeline's own multiple (check_inputs: 8), not the VAE's 2
    (dict(image_size=0), ValueError, r"image_size must be an int or \(height, width\) of positive ints, got 0"),
    (dict(image_size=(32, -8)), ValueError, r"positive ints, got \(32, -8\)"),
    (dict(image_size=32.0), ValueError, "positive ints, got 32.0"),
    (dict(image_size=True), ValueError, "positive ints, got True"),
    (dict(image_size=12), ValueError, r"image_size \(12, 12\) is not a multiple of 8 .*StableDiffusionPipeline takes "
                                      "multiples of 8"),
    (dict(image_size=30), ValueError, r"image_size \(30, 30\) is not a multiple of 8"),
    (dict(image_size=(32, 36)), ValueError, r"image_size \(32, 36\) is not a multiple of 8"),
    # seed
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(seed=1.7), TypeError, r"seed must be an int, got 1.7 \(float\)"),
    (dict(seed=True), TypeError, r"seed must be an int, got True \(bool\)"),
    (dict(seed="0"), TypeError, r"seed must be an int, got '0' \(str\)"),
    # stream and dataset sizes
    (dict(reuse=1.5), TypeError, r"reuse must be an int, got 1.5 \(float\)"),
    (dict(reuse=0), ValueError, "reuse must be >= 1, got 0"),
    (dict(num_samples=2.0), TypeError, r"num_samples must be an int, got 2.0 \(float\)"),
    (dict(num_samples=0), ValueError, "num_samples must be >= 1, got 0"),
    (dict(length=2.5), TypeError, r"length must be an int, got 2.5 \(float\)"),
    (dict(length=0), ValueError, "length must be >= 1, got 0"),
    (dict(cache_size="64"), TypeError, r"cache_size must be an int, got '64' \(str\)"),
    (dict(cache_size=-1), ValueError, "cache_size must be >= "),
    # sampler
    (dict(generator={"num_inference_steps": 2.5}), TypeError, r"num_inference_steps must be an int, got 2.5"),
    (dict(generator={"num_inference_steps": True}), TypeError, r"num_inference_steps must be an int, got True \(bool\)"),
    (dict(generator={"num_inference_steps": 0}), ValueError, "num_inference_steps must be >= 1, got 0"),
    (dict(generator={"batch_size": 2.0}), TypeError, r"batch_size must be an int, got 2.0 \(float\)"),
    (dict(generator={"classes_per_prompt": "2"}), TypeError, "classes_per_prompt must be an int, got '2'"),
    (dict(generator={"guidance_scale": math.nan}), ValueError, "guidance_scale must be finite, got nan"),
    (dict(generator={"guidance_scale": math.inf}), ValueError, "guidance_scale must be finite, got inf"),
    (dict(generator={"guidance_scale": "7.5"}), TypeError, r"guidance_scale must be a number, got '7.5' \(str\)"),
    (dict(generator={"guidance_scale": -2.0}), ValueError, "guidance_scale must be >= 0, got -2.0"),
    (dict(generator={"guidance_scale": 1.0}), ValueError, "guidance_scale=1.0 turns classifier-free guidance off in a "
                                                        r"StableDiffusionPipeline .*> 1 \(this model's default: 7.5\)"),
    (dict(generator={"guidance_scale": 0.5}), ValueError, "guidance_scale=0.5 turns classifier-free guidance off"),
    (dict(generator={"scheduler": "NoSuchScheduler"}), ValueError, "unknown diffusers scheduler 'NoSuchScheduler'"),
    (dict(generator={"scheduler": "DDIMSchedular"}), ValueError, "unknown diffusers scheduler 'DDIMSchedular'; did you "
                                                               "mean 'DDIMScheduler'"),
    (dict(generator={"scheduler": "StableDiffusionPipeline"}), ValueError, "unknown diffusers scheduler"),
    (dict(generator={"scheduler": 42}), TypeError, r"scheduler must be a diffusers scheduler class name .*got 42"),
    # mask
    (dict(mask={"resolution_weights": {1: math.nan}}), ValueError, r"resolution_weights\[1\] must be finite, got nan"),
    (dict(mask={"resolution_weights": {1: math.inf}}), ValueError, r"resolution_weights\[1\] must be finite, got inf"),
    (dict(mask={"resolution_weights": {1.5: 1.0}}), TypeError, "resolution_weights key 1.5 must be an int"),
    (dict(mask={"resolution_weights": [1, 2]}), TypeError, r"resolution_weights must be a dict .*got \[1, 2\]"),
    (dict(mask={"threshold": math.nan}), ValueError, "threshold must be finite, got nan"),
    (dict(mask={"class_thresholds": {"circle": math.nan}}), ValueError, r"class_thresholds\['circle'\] must be finite"),
    (dict(mask={"timestep_window": (0.5, math.nan)}), ValueError, "timestep_window must be finite, got nan"),
    (dict(mask={"timestep_window": 0.5}), TypeError, r"timestep_window must be \(start, end\), got 0.5"),
    (dict(mask={"self_attention_factor": 2.0}), TypeError, r"self_attention_factor must be an int, got 2.0 \(float\)"),
    (dict(mask={"refine_iterations": 2.5}), TypeError, "refine_iterations must be an int, got 2.5"),
    # quality
    (dict(quality={"black_level": math.nan}), ValueError, "black_level must be finite, got nan"),
    (dict(quality={"black_level": -0.1}), ValueError, r"black_level must be in \[0, 1\), got -0.1"),
    (dict(quality={"black_level": 5}), ValueError, r"black_level must be in \[0, 1\), got 5"),
    (dict(quality={"black_level": 1.0}), ValueError, r"black_level must be in \[0, 1\), got 1.0"),
    (dict(quality={"min_foreground": math.nan}), ValueError, "min_foreground must be finite, got nan"),
    (dict(quality={"max_consecutive_rejects": 1.5}), TypeError, "max_consecutive_rejects must be an int, got 1.5"),
    # device
    (dict(device="bogus"), ValueError, "device 'bogus' is not a torch device name"),
    (dict(device=0), TypeError, r"device must be a str .*got 0 \(int\)"),
    # transforms
    (dict(transform=42), TypeError, r"transform must be callable or None, got 42 \(int\)"),
    (dict(transforms="flip"), TypeError, "transforms must be callable or None, got 'flip'"),
    (dict(target_transform=1.0), TypeError, "target_transform must be callable or None, got 1.0"),
    (dict(augment="no"), TypeError, r"augment must be True or False, got 'no' \(str\)"),
    # label space, classes, vocabulary
    (dict(label_space=["background", None, "ring"]), TypeError,
     r"label_space must hold non-empty strings, got None in \['background', None, 'ring'\]"),
    (dict(label_space="voc"), TypeError, "label_space must be a list of class names, got the string 'voc' .*"
                                         "vocabulary='voc'"),
    (dict(classes=None), TypeError, r"classes must be a list of names, got None \(NoneType\)"),
    (dict(classes=["circle", 3]), TypeError, r"classes must hold non-empty strings, got 3"),
    (dict(vocabulary=42), TypeError, r"vocabulary must be .*got 42 \(int\)"),
    # the model, checked before anything else (here: before the classes it would not know)
    (dict(model=123, classes=["no-such-class"]), TypeError,
     r"model must be a hub id, a local diffusers folder or a callable, got 123 \(int\)"),
    (dict(model="", classes=["no-such-class"]), ValueError, "model is an empty name"),
    # classes as users type them: repeated, or a vocabulary class in another case or spacing
    (dict(classes=["circle", "circle"]), ValueError, "classes repeats 'circle': name each class once"),
    (dict(classes=["Circle"]), ValueError, "class 'Circle' is another spelling of the label space's 'circle' "
                                           r"\(case, spacing, Unicode form, invisible characters or look-alike letters\); write 'circle'"),
    (dict(classes=["circle "], vocabulary="toy"), ValueError, "class 'circle ' is another spelling of .*'circle'"),
    (dict(classes=["RING"], vocabulary={"templates": ["a {class}"]}), ValueError, "class 'RING' is another spelling"),
    (dict(classes=["red panda", "Red  Panda"], vocabulary="toy"), ValueError,
     "classes 'red panda' and 'Red  Panda' are spellings of one class"),
    (dict(classes=["circle\u200b"], vocabulary="toy"), ValueError, "is another spelling of the label space's 'circle'"),
    (dict(classes=["ｃｉｒｃｌｅ"], vocabulary="toy"), ValueError, "is another spelling of the label space's 'circle'"),
    (dict(classes=["cir\u00adcle"], vocabulary="toy"), ValueError, "is another spelling of the label space's 'circle'"),
    (dict(classes=["caf\u00e9", "cafe\u0301"], vocabulary="toy"), ValueError, "are spellings of one class"),
    (dict(classes=["\u0441ircle"], vocabulary="toy"), ValueError, "mixes writing systems \\(CYRILLIC, LATIN\\)"),
    (dict(classes=["\u200b"], vocabulary="toy"), ValueError, "has no visible characters"),
    (dict(classes=["background\u200b"], vocabulary="toy"), ValueError, "another spelling of the label space's 'backgr"),
    # invisible characters that are not format characters, controls, marks on nothing, whole look-alike words
    *[(dict(classes=[f"circle{mark}"], vocabulary="toy"), ValueError, "another spelling of the label space's 'circle'")
      for mark in ("\u034f", "\ufe0f", "\u2800", "\U000e0100", "\x00")],
    (dict(classes=["ring", "ring\u034f"], vocabulary="toy"), ValueError, "another spelling of the label space's 'ring'"),
    (dict(classes=["\u0323"], vocabulary="toy"), ValueError, "has no visible characters"),
    (dict(label_space=["background", "Circle", "circle"], classes=["circle"]), ValueError,
     "label_space names one class twice, as 'Circle' and 'circle'"),
    (dict(classes=["\u0441\u0456\u0433\u0441\u04cf\u0435"], vocabulary="toy"), ValueError,
     "another spelling of the label space's 'circle' .*look-alike letters"),
    (dict(image_size=100_000), ValueError, r"image_size 100000 is larger than any model generates \(8192 px a side\)"),
    (dict(generator={"scheduler": "FlowMatchEulerDiscreteScheduler"}), ValueError,
     "scheduler: FlowMatchEulerDiscreteScheduler cannot drive a Stable Diffusion 1.x/2.x model"),
    (dict(classes=["tv monitor"], vocabulary="voc"), ValueError, "another spelling of the label space's 'tvmonitor'"),
    (dict(classes=["potted plant"], vocabulary="voc"), ValueError, "another spelling of the label space's 'pottedplant'"),
]


def cases(kind):
    skip = DATASET_ONLY if kind == "stream" else STREAM_ONLY
    return [pytest.param(kind, options, error, message, id=f"{kind}-{options}")
            for options, error, message in BAD_VALUES if not set(options) & skip]


def construct(kind, **options):
    kwargs = dict(model=TOY_MODEL, classes=["circle"], **({"length": 4} if kind == "dataset" else {}))
    kwargs.update(options)
    return (DiffuMaskStream if kind == "stream" else DiffuMaskDataset)(**kwargs)


@pytest.fixture(autouse=True)
def refuse_loading(monkeypatch):
    """Fail whatever loads a pipeline: every error here must come before."""
    from diffusers import DiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded during construction")

    monkeypatch.setattr(source, "load_pipeline", refuse)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("kind, options, error, message", cases("stream") + cases("dataset"))
def test_bad_values_fail_at_construction_naming_the_value(kind, options, error, message):
    with pytest.raises(error, match=message):
        construct(kind, **options)


@pytest.mark.parametrize("kind", ["stream", "dataset"])
def test_numpy_integers_are_ints(kind):
    made = construct(kind, seed=np.int64(2), image_size=np.int64(32), generator={"batch_size": np.int32(2)},
                     **({"reuse": np.int16(2), "cache_size": np.int64(4)} if kind == "stream" else
                        {"length": np.int64(4), "cache_size": np.uint8(4)}))
    assert made.config.image_size == (32, 32) and type(made.config.image_size[0]) is int
    assert json.loads(made.config.to_json())["generator"]["batch_size"] == 2
    assert construct(kind, image_size=(np.int32(32), 40)).config.image_size == (32, 40)


@pytest.mark.parametrize("kind", ["stream", "dataset"])
def test_good_values_pass_and_construction_loads_nothing(kind):
    started = time.perf_counter()
    made = construct(kind, seed=3, image_size=(32, 40), device="cpu", generator={"scheduler": "DDIMScheduler",
                                                                            "guidance_scale": 4}, augment=False)
    assert made.config.image_size == (32, 40) and made.config.generator.guidance_scale == 4.0
    assert made.source.seed == 3
    assert time.perf_counter() - started < 30, "construction reads configs and headers, never weights"


def test_unavailable_cuda_is_an_error_at_construction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' is not available on this machine \(torch.cuda.is_available"):
        construct("stream", device="cuda")
    with pytest.raises(ValueError, match="device 'cuda:1' is not available"):
        check_device(torch.device("cuda", 1))


def test_cuda_index_beyond_the_count_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 cuda device\(s\)"):
        check_device("cuda:2")
    assert check_device(None) is None and check_device("cpu") == torch.device("cpu")


def test_an_uncached_hub_model_is_an_error_when_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="model 'tiny-random' is neither a local folder nor in the Hugging "
                                                "Face cache, and HF_HUB_OFFLINE is set"):
        construct("stream", model="tiny-random")


def test_guidance_distilled_flux_takes_guidance_up_to_one(tmp_path):
    from ondemand_seg.pipelines.tiny import save_tiny_pipeline

    schnell = save_tiny_pipeline(tmp_path / "schnell", "flux-schnell")
    stream = DiffuMaskStream(schnell, ["dog"], image_size=64, generator={"guidance_scale": 0.0})
    assert stream.config.generator.guidance_scale == 0.0
    assert DiffuMaskStream(schnell, ["dog"], image_size=64, generator={"guidance_scale": 1.0})
    with pytest.raises(ValueError, match="guidance_scale must be finite, got nan"):
        DiffuMaskStream(schnell, ["dog"], image_size=64, generator={"guidance_scale": math.nan})


def test_a_callable_models_guidance_is_checked_when_it_loads(monkeypatch):
    # A callable's pipeline class is known only once it is called, in whichever process draws.
    from ondemand_seg.pipelines.loading import load_pipeline
    from ondemand_seg.pipelines.tiny import build_tiny_pipeline

    monkeypatch.setattr(source, "load_pipeline", load_pipeline)

    stream = DiffuMaskStream(lambda: build_tiny_pipeline("sd1"), ["dog"], image_size=32,
                             generator={"guidance_scale": 1.0, "num_inference_steps": 2})
    with pytest.raises(ValueError, match="guidance_scale=1.0 turns classifier-free guidance off in a "
                                         "StableDiffusionPipeline"):
        next(iter(stream))


def test_validators_name_the_value():
    assert check_int("n", 3, minimum=1) == 3 and check_finite("x", 2) == 2.0
    with pytest.raises(TypeError, match=r"n must be an int, got False \(bool\)"):
        check_int("n", False)
    with pytest.raises(TypeError, match=r"x must be a number, got None \(NoneType\)"):
        check_finite("x", None)


# ------------------------------------------------------------------------------ model folders
def write_header(path, header, data=b"", raw=None):
    raw = raw if isinstance(raw, bytes) else (raw or json.dumps(header)).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def edit_config(component, name="config.json", **changes):
    def apply(folder):
        path = folder / component / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return apply


def fifo(path):
    if path.exists():
        path.unlink()
    os.mkfifo(path)


def reencode(path, encoding):
    path.write_text(path.read_text(encoding="utf-8"), encoding=encoding)


def sparse(path, size):
    with open(path, "r+b") as file:
        file.truncate(size)


def edit_header(path, rename=None, dtype=None, overlap=None, metadata=None):
    """Rewrite a safetensors file's header, keeping its data bytes."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    if rename:
        header[rename[1]] = header.pop(rename[0])
    if dtype:
        header[dtype[0]]["dtype"] = dtype[1]
    if overlap:  # two tensors of one size share the first one's bytes
        tensors = {name: t for name, t in header.items() if name != "__metadata__"}
        first, second = next((a, b) for a in tensors for b in tensors
                             if a < b and tensors[a]["shape"] == tensors[b]["shape"] == [16])
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
    if metadata is not None:
        header["__metadata__"] = metadata
    write_header(path, header, data)


def recode_header(path, encode):
    """Rewrite a safetensors header's JSON text as ``encode(text)`` bytes, keeping its data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    write_header(path, None, raw[8 + length:], raw=encode(raw[8:8 + length].decode()))


def edit_index(change):
    def apply(folder):
        index = json.loads((folder / "model_index.json").read_text())
        change(index)
        (folder / "model_index.json").write_text(json.dumps(index))
    return apply


# (how to break a copy of the tiny SD folder, the ValueError's message: it names the file at fault)
BROKEN_FOLDERS = [
    ("index not JSON", lambda f: (f / "model_index.json").write_text("{not json"), r"model_index.json is not valid JSON"),
    ("index binary", lambda f: (f / "model_index.json").write_bytes(b"\xff\xfe\x00"), r"model_index.json is not UTF-8 text"),
    ("index without tokenizer", edit_index(lambda i: i.pop("tokenizer")),
     r"model_index.json names no tokenizer: a StableDiffusionPipeline needs them"),
    ("index entry not a pair", edit_index(lambda i: i.update(unet="UNet2DConditionModel")),
     r"component 'unet' must be \[library, class name\], got 'UNet2DConditionModel'"),
    ("no unet folder", lambda f: shutil.rmtree(f / "unet"),
     r"unet is missing \(model_index.json names a UNet2DConditionModel there\)"),
    ("no text encoder folder", lambda f: shutil.rmtree(f / "text_encoder"),
     r"text_encoder is missing \(model_index.json names a CLIPTextModel there\)"),
    ("no scheduler config", lambda f: (f / "scheduler" / "scheduler_config.json").unlink(),
     r"scheduler/scheduler_config.json is missing \(a DDIMScheduler needs it\)"),
    ("no text encoder config", lambda f: (f / "text_encoder" / "config.json").unlink(),
     r"text_encoder/config.json is missing \(a CLIPTextModel needs it\)"),
    ("vae config not JSON", lambda f: (f / "vae" / "config.json").write_text("{"), r"vae/config.json is not valid JSON"),
    ("text encoder config not JSON", lambda f: (f / "text_encoder" / "config.json").write_text("]"),
     r"text_encoder/config.json is not valid JSON"),
    ("preset not JSON", lambda f: (f / PRESET_FILE).write_text('{"image_size": '), rf"{PRESET_FILE} is not valid JSON"),
    ("no unet weights", lambda f: (f / UNET_WEIGHTS).unlink(), r"unet holds no .safetensors weights"),
    ("truncated weights", lambda f: truncate(f / UNET_WEIGHTS), rf"{UNET_WEIGHTS} is truncated: tensor '.*' ends at byte"),
    ("header of 2^40 bytes", lambda f: (f / UNET_WEIGHTS).write_bytes((2**40).to_bytes(8, "little") + b"{}"),
     rf"{UNET_WEIGHTS} is truncated or corrupt: its header claims 1099511627776 bytes"),
    ("weights shorter than a header", lambda f: (f / UNET_WEIGHTS).write_bytes(b"abc"),
     rf"{UNET_WEIGHTS} is not a safetensors file: 3 bytes"),
    ("header not JSON", lambda f: (f / UNET_WEIGHTS).write_bytes((4).to_bytes(8, "little") + b"{{{{"),
     rf"{UNET_WEIGHTS} is corrupt: its header is not valid JSON"),
    ("offsets beyond the data", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F32", "shape": [4],
                                                                             "data_offsets": [0, 16]}}, b"\0" * 8),
     rf"{UNET_WEIGHTS} is truncated: tensor 'w' ends at byte 16 of the data, but the file holds 8 bytes"),
    ("offsets malformed", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F32", "shape": [1],
                                                                       "data_offsets": [8, 4]}}, b"\0" * 8),
     rf"{UNET_WEIGHTS} is corrupt: tensor 'w' has no valid data_offsets"),
    ("missing shard", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "diffusion_pytorch_model-00002-of-00002.safetensors"}})),
     (r"names shard\(s\) that are missing or not .safetensors files: "
      r"\['diffusion_pytorch_model-00002-of-00002.safetensors'\]")),
    # safetensors headers whose description disagrees with the bytes
    ("dtype disagrees with bytes", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F32", "shape": [4],
                                                                                   "data_offsets": [0, 8]}}, b"\0" * 8),
     rf"{UNET_WEIGHTS} is corrupt: tensor 'w' is F32 of shape \[4\], 16 bytes, but its data_offsets \[0, 8\] hold 8"),
    ("unknown dtype", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F7", "shape": [2],
                                                                    "data_offsets": [0, 8]}}, b"\0" * 8),
     rf"{UNET_WEIGHTS} is corrupt: tensor 'w' has unknown dtype 'F7'"),
    ("negative dimension", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F32", "shape": [-2, -1],
                                                                         "data_offsets": [0, 8]}}, b"\0" * 8),
     rf"{UNET_WEIGHTS} is corrupt: tensor 'w' has shape \[-2, -1\]; a shape is a list of non-negative ints"),
    # config values of the wrong type, named with their file and field
    ("unet sample_size a string", edit_config("unet", sample_size="big"),
     r"unet/config.json: sample_size must be int \| tuple\[int, int\] \| None, got 'big'"),
    ("vae block_out_channels a string", edit_config("vae", block_out_channels="abc"),
     r"vae/config.json: block_out_channels must be tuple\[int\], got 'abc'"),
    ("scheduler beta_schedule a number", edit_config("scheduler", "scheduler_config.json", num_train_timesteps="1000"),
     r"scheduler/scheduler_config.json: num_train_timesteps must be int, got '1000'"),
    ("text encoder hidden_size a string", edit_config("text_encoder", hidden_size="abc"),
     r"text_encoder/config.json: .*'hidden_size' expected int, got str"),
    # class names diffusers or transformers do not have, and modules other than theirs
    ("unknown scheduler class", edit_index(lambda i: i.update(scheduler=["diffusers", "FooScheduler"])),
     r"model_index.json: component 'scheduler' \(diffusers.FooScheduler\): diffusers .* has no class 'FooScheduler'"),
    ("component from another module", edit_index(lambda i: i.update(unet=["my_models", "UNet"])),
     r"component 'unet' \(my_models.UNet\) comes from 'my_models'; only diffusers and transformers classes"),
    ("custom pipeline code", edit_index(lambda i: i.update(_class_name=["pipeline", "MyPipeline"])),
     r"_class_name must be a diffusers pipeline class name, got \['pipeline', 'MyPipeline'\]"),
    ("pipeline class unknown", edit_index(lambda i: i.update(_class_name="FooPipeline")),
     r"_class_name: diffusers .* has no class 'FooPipeline'"),
    # files a loader would block on or misread
    ("weights a FIFO", lambda f: fifo(f / UNET_WEIGHTS), rf"{UNET_WEIGHTS} is a FIFO; a regular file is needed"),
    ("index a FIFO", lambda f: fifo(f / "model_index.json"), r"model_index.json is a FIFO"),
    ("preset a FIFO", lambda f: fifo(f / PRESET_FILE), rf"{PRESET_FILE} is a FIFO"),
    ("tokenizer vocabulary in UTF-16", lambda f: reencode(f / "tokenizer" / "tokenizer.json", "utf-16"),
     r"tokenizer/tokenizer.json is not UTF-8 text \(it starts with a UTF-16 byte-order mark"),
    # the third round: the whole folder, file sizes, nesting, names, kinds, code, configs that do not build
    ("a FIFO beside the components", lambda f: fifo(f / "notes"), r"model/notes is a FIFO"),
    ("a link to /dev/zero", lambda f: (f / "z.bin").symlink_to("/dev/zero"), r"z.bin is not a regular file"),
    ("a tokenizer file of 600 MiB", lambda f: sparse(f / "tokenizer" / "tokenizer.json", 600 * 2**20),
     r"tokenizer.json is 600 MiB, larger than any text file"),
    ("a preset nested too deeply", lambda f: (f / PRESET_FILE).write_text("[" * 100_000 + "]" * 100_000),
     rf"{PRESET_FILE} is not valid JSON: it is nested too deeply"),
    ("a component named ..", edit_index(lambda i: i.update({"..": ["diffusers", "DDIMScheduler"]})),
     r"component name '..' is not a plain folder name"),
    ("an Auto class", edit_index(lambda i: i.update(text_encoder=["transformers", "AutoModel"])),
     r"AutoModel is not a model, scheduler, tokenizer or image processor class"),
    ("a pipeline as a component", edit_index(lambda i: i.update(unet=["diffusers", "DiffusionPipeline"])),
     r"DiffusionPipeline is not a model, scheduler, tokenizer or image processor class"),
    ("code in a component folder", lambda f: (f / "unet" / "diffusers.py").write_text("x = 1\n"),
     r"unet/diffusers.py is code in a component folder"),
    ("layers_per_block 0", edit_config("unet", layers_per_block=0),
     r"unet: the weights hold \d+ tensor\(s\) its config.json has no place for"),
    ("channels not divisible by the groups", edit_config("unet", norm_num_groups=7),
     r"unet/config.json: a UNet2DConditionModel cannot be built from it .*divisible"),
    ("a bogus beta schedule", edit_config("scheduler", "scheduler_config.json", beta_schedule="bogus"),
     r"scheduler_config.json: a DDIMScheduler cannot be built from it"),
    ("cross_attention_dim unlike the weights", edit_config("unet", cross_attention_dim=48),
     r"unet: tensor '.*attn2.to_k.weight' is \[\d+, 32\] in the weights but \[\d+, 48\] by config.json"),
    ("a renamed tensor", lambda f: edit_header(f / UNET_WEIGHTS, rename=("conv_in.weight", "conv_in.weights")),
     r"unet: the weights lack 1 tensor\(s\) its config.json asks for, such as \['conv_in.weight'\]"),
    ("a float weight stored as I32", lambda f: edit_header(f / UNET_WEIGHTS, dtype=("conv_in.weight", "I32")),
     r"unet: tensor 'conv_in.weight' is stored as I32, but it is a floating-point weight"),
    ("overlapping tensors", lambda f: edit_header(f / UNET_WEIGHTS, overlap=True),
     rf"{UNET_WEIGHTS} is corrupt: tensor .* overlaps the tensor before it"),
    ("a repeated tensor name", lambda f: write_header(f / UNET_WEIGHTS, {"w": {"dtype": "F32", "shape": [1],
                                                                             "data_offsets": [0, 4]}}, b"\0" * 4,
                                                    raw='{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                                                        ' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     rf"{UNET_WEIGHTS} is corrupt: its header is not valid JSON \(repeated key\(s\) \['w'\]\)"),
    ("metadata not strings", lambda f: edit_header(f / UNET_WEIGHTS, metadata=[1, 2]),
     rf"{UNET_WEIGHTS} is corrupt: its __metadata__ must map strings to strings"),
    ("a shard outside the folder", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../outside.safetensors"}})),
     r"names shard\(s\) that are not files of .*unet: \['../../outside.safetensors'\]"),
    ("a tokenizer without its vocabulary", lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
     r"tokenizer|vocabulary"),
    ("a text encoder with fewer layers than its weights", edit_config("text_encoder", num_hidden_layers=0),
     r"text_encoder: the weights hold \d+ tensor\(s\) its config.json has no place for"),
    ("sample_size 0", edit_config("unet", sample_size=0), r"unet/config.json: sample_size must hold positive ints, got 0"),
    ("empty block_out_channels", edit_config("vae", block_out_channels=[]), r"vae/config.json"),
    # the fourth round: linked folders, the file each loader reads, prompt length, numbers a draw cannot use
    ("a FIFO in a symlinked component folder", lambda f: link_out(f, "tokenizer", fifo_name="merges.txt"),
     r"tokenizer/merges.txt is a FIFO"),
    ("a link to / in a component folder", lambda f: (f / "vae" / "root").symlink_to("/"),
     r"holds more than 10,000 files .*a symlinked folder leads outside it"),
    ("text encoder weights under diffusers' name", lambda f: (f / "text_encoder" / "model.safetensors").rename(
        f / "text_encoder" / "diffusion_pytorch_model.safetensors"),
     r"text_encoder has no model.safetensors .*the file a CLIPTextModel loads; it holds diffusion_pytorch_model"),
    ("only a variant of the unet weights", lambda f: (f / UNET_WEIGHTS).rename(
        f / "unet" / "diffusion_pytorch_model.fp16.safetensors"),
     r"unet has no diffusion_pytorch_model.safetensors .*variants such as .* are not loaded"),
    ("prompts longer than the text encoder's positions",
     edit_config("tokenizer", "tokenizer_config.json", model_max_length=100_000),
     r"tokenizer: model_max_length 100000 is more than the \d+ positions .*text_encoder/config.json has"),
    ("a tokenizer length of -5", edit_config("tokenizer", "tokenizer_config.json", model_max_length=-5),
     r"tokenizer: model_max_length must be a positive int, got -5"),
    ("a NaN in the scheduler config", edit_config("scheduler", "scheduler_config.json", beta_end=float("nan")),
     r"scheduler_config.json: beta_end is NaN"),
    ("an infinite config value", edit_config("scheduler", "scheduler_config.json", beta_end=float("inf")),
     r"scheduler_config.json: beta_end is inf; it must be finite here"),
    ("vae scaling_factor 0", edit_config("vae", scaling_factor=0), r"vae/config.json: scaling_factor must be > 0, got 0"),
    ("a flow-matching scheduler on SD", edit_index(lambda i: i.update(scheduler=["diffusers",
                                                                                 "FlowMatchEulerDiscreteScheduler"])),
     r"FlowMatchEulerDiscreteScheduler cannot drive a Stable Diffusion 1.x/2.x model"),
    ("fewer training timesteps than steps", edit_config("scheduler", "scheduler_config.json", num_train_timesteps=1),
     r"num_inference_steps=\d+ is more than this model's scheduler has timesteps \(num_train_timesteps=1"),
    ("sample_size beyond any image", edit_config("unet", sample_size=100_000),
     r"unet/config.json: sample_size 100000 makes \d+ px images, larger than any model generates"),
    # the sixth round: a component the pipeline needs, saved as absent (it loaded as None, then a draw failed)
    ("the unet saved as absent", edit_index(lambda i: i.update(unet=[None, None])),
     r"saves unet as absent \(\[null, null\]\), and a StableDiffusionPipeline cannot run without it"),
    # a header Python's json reads but the safetensors reader does not: it failed at the first draw
    ("a header with a byte-order mark", lambda f: recode_header(f / UNET_WEIGHTS, lambda text: b"\xef\xbb\xbf" + text.encode()),
     r"diffusion_pytorch_model.safetensors is corrupt: its header is not valid JSON \(Unexpected UTF-8 BOM"),
    ("a UTF-16 header", lambda f: recode_header(f / UNET_WEIGHTS, lambda text: text.encode("utf-16-le")),
     r"diffusion_pytorch_model.safetensors is corrupt: its header is not valid JSON"),
    # a value equal to its default but of another type, and an ndarray field, named with their field
    ("an int field as a float equal to its default", edit_config("unet", in_channels=4.0),
     r"unet/config.json: in_channels must be int, got 4.0"),
    ("trained_betas a string", edit_config("scheduler", "scheduler_config.json", trained_betas="abc"),
     r"scheduler_config.json: trained_betas must be numpy.ndarray \| list\[float\] \| None, got 'abc'"),
    # building ten million layers, shapes only, took hours
    ("ten million unet layers", edit_config("unet", layers_per_block=10**7),
     r"unet/config.json: a UNet2DConditionModel cannot be built from it \(ValueError: it describes a far larger "
     r"model than its weights"),
    ("ten million text encoder layers", edit_config("text_encoder", num_hidden_layers=10**7),
     r"text_encoder/config.json: a CLIPTextModel cannot be built from it \(ValueError: it describes a far larger"),
    ("the tokenizer and text encoder saved as absent",
     edit_index(lambda i: i.update(tokenizer=[None, None], text_encoder=[None, None])),
     r"saves text_encoder, tokenizer as absent .* cannot run without them"),
]


def link_out(folder, component, fifo_name):
    """Move ``component`` beside the model folder, link it back (a shared cache), and put a FIFO
    named ``fifo_name`` in it."""
    outside = folder.parent / f"shared-{component}"
    shutil.move(folder / component, outside)
    (folder / component).symlink_to(outside, target_is_directory=True)
    fifo(outside / fifo_name)


@pytest.fixture
def sd_copy(tiny_sd1, tmp_path):
    return shutil.copytree(tiny_sd1, tmp_path / "model")


def test_an_intact_folder_passes_the_folder_check(sd_copy):
    spec = check_model_source(sd_copy)
    assert spec.family.name == "sd"
    assert DiffuMaskStream(sd_copy, ["dog"], image_size=64).config.image_size == (64, 64)


@pytest.mark.parametrize("kind", ["stream", "dataset"])
@pytest.mark.parametrize("break_it, message", [pytest.param(b, m, id=name) for name, b, m in BROKEN_FOLDERS])
def test_broken_model_folders_fail_at_construction_naming_the_file(sd_copy, kind, break_it, message):
    break_it(sd_copy)
    with within_seconds(60), pytest.raises(ValueError, match=message):
        construct(kind, model=sd_copy, classes=["dog"], image_size=64)


@contextlib.contextmanager
def within_seconds(seconds):
    """Fail a check that blocks (opening a FIFO waits for a writer forever) instead of hanging."""
    def timed_out(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_no_module_a_folder_names_is_imported(sd_copy, tmp_path, monkeypatch):
    """A component (or a custom pipeline) from a module of the folder's or the path's is refused by
    name, and the module never runs."""
    marker = tmp_path / "imported"
    for module in ("my_models", "pipeline"):
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass UNet: pass\n"
                                              "class MyPipeline: pass\n")
        shutil.copy(tmp_path / f"{module}.py", sd_copy / f"{module}.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(sd_copy)
    index = json.loads((sd_copy / "model_index.json").read_text())
    for change in ({"unet": ["my_models", "UNet"]}, {"_class_name": ["pipeline", "MyPipeline"]},
                   {"unet": ["os", "system"]}, {"unet": ["diffusers", "os"]}):
        (sd_copy / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match="only diffusers and transformers|must be a diffusers pipeline class name"
                                             "|has no class 'os'"):
            DiffuMaskStream(sd_copy, ["dog"], image_size=64)
    assert not marker.exists(), "a module the folder named was imported"


def test_a_subclass_of_a_supported_pipeline_is_recognised_by_its_bases():
    from diffusers import StableDiffusionPipeline

    from ondemand_seg.pipelines.families import describe_pipeline, family_of
    from ondemand_seg.pipelines.tiny import build_tiny_pipeline

    class MyPipeline(StableDiffusionPipeline):
        pass

    assert family_of(MyPipeline).name == "sd"
    pipeline = MyPipeline(**build_tiny_pipeline("sd1").components)
    assert describe_pipeline(pipeline).pipeline_class == "StableDiffusionPipeline"
    with pytest.raises(ValueError, match="cannot capture text attention from a MyOwnPipeline"):
        family_of(type("MyOwnPipeline", (), {}))


def test_check_safetensors_reads_only_the_header(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, str(good))
    check_safetensors(good)
    assert check_safetensors(good) == {"a": ("F32", [3]), "b": ("F32", [2, 2])}
    with open(good, "ab") as stream:  # the reference reader refuses bytes no tensor covers
        stream.write(b"\0")
    with pytest.raises(ValueError, match=r"good.safetensors is corrupt: its tensors cover 28 bytes, but it holds 29"):
        check_safetensors(good)
    truncate(good)
    with pytest.raises(ValueError, match=r"good.safetensors is truncated"):
        check_safetensors(good)


def test_a_vocabulary_file_a_preset_names_is_found_beside_it(sd_copy, tmp_path, monkeypatch):
    (sd_copy / "pets.json").write_text(json.dumps({"classes": ["dog", "hamster"]}))
    (sd_copy / PRESET_FILE).write_text(json.dumps({"vocabulary": "pets.json"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pets.json").write_text(json.dumps({"classes": ["cat"]}))  # the same name where the program runs
    monkeypatch.chdir(elsewhere)
    stream = DiffuMaskStream(sd_copy, ["hamster"], image_size=64)
    assert stream.config.label_space == ("background", "dog", "hamster")
    for outside in ("../elsewhere/pets.json", str(elsewhere / "pets.json")):
        (sd_copy / PRESET_FILE).write_text(json.dumps({"vocabulary": outside}))
        with pytest.raises(ValueError, match=f"vocabulary '{outside}' is not a file of the model folder"):
            DiffuMaskStream(sd_copy, ["hamster"], image_size=64)


def test_sd3_without_its_t5_encoder_is_a_valid_folder(tmp_path):
    from ondemand_seg.pipelines.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "sd3", "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    assert check_model_source(folder).family.name == "sd3"
