"""The package's top level: public names load on first use, the mask math and the settings load
without diffusers or albumentations, and renamed names say what they are called now."""
import subprocess
import sys

import pytest

import ondemand_seg

LIGHT_MODULES = ["ondemand_seg", "ondemand_seg.masks.maps", "ondemand_seg.masks.labelling",
                 "ondemand_seg.masks.attention", "ondemand_seg.masks.quality", "ondemand_seg.settings.config",
                 "ondemand_seg.settings.resolve", "ondemand_seg.settings.vocabulary", "ondemand_seg.generation.seeding",
                 "ondemand_seg.data.sharding", "ondemand_seg.metrics"]
HEAVY = ["diffusers", "transformers", "albumentations", "cv2"]


def test_importing_the_package_and_the_mask_math_loads_no_model_library():
    code = (f"import sys\nfor name in {LIGHT_MODULES!r}: __import__(name)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"loaded on import: {done.stdout.strip()}"


def test_every_public_name_resolves_and_is_listed():
    for name in ondemand_seg.__all__:
        assert getattr(ondemand_seg, name) is not None
    assert set(ondemand_seg.__all__) <= set(dir(ondemand_seg))
    assert ondemand_seg.DiffuMaskGenerator.__module__ == "ondemand_seg.generation.generator"


@pytest.mark.parametrize("old, new", [("SamplerConfig", "GeneratorConfig"), ("DiffuMaskSampler", "DiffuMaskGenerator")])
def test_renamed_names_say_their_new_name(old, new):
    with pytest.raises(AttributeError, match=f"ondemand_seg.{old} is now ondemand_seg.{new}"):
        getattr(ondemand_seg, old)
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        ondemand_seg.Nothing  # noqa: B018


def test_the_renamed_settings_section_is_named_with_its_new_name():
    from ondemand_seg import resolve_config

    with pytest.raises(ValueError, match="renamed setting.*'sampler' is now 'generator'"):
        resolve_config("toy", ["circle"], sampler={"batch_size": 2})
