import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ondemand_seg import DiffuMaskDataset, DiffuMaskStream, GeneratorConfig, SegmentationTransform
from ondemand_seg.data import sharding
from ondemand_seg.data.stream import StreamIterator, splice_partners
from ondemand_seg.generation.generator import RawSample


def collect(stream, **loader):
    images, masks = [], []
    for image, mask in DataLoader(stream, batch_size=2, **loader):
        images += list(image)
        masks += list(mask)
    return images, masks


def same_samples(a_images, a_masks, b_images, b_masks, atol=0.02):
    """Match samples across runs up to float rounding of batched kernels (1/255 in uint8 ≈ 0.018 normalized)."""
    unmatched = list(range(len(b_images)))
    for image, mask in zip(a_images, a_masks):
        hit = next((j for j in unmatched if torch.equal(mask, b_masks[j]) and torch.allclose(image, b_images[j], atol=atol)), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return not unmatched


def test_yields_torchvision_format(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["bird", "dog"], num_samples=4, **fast)
    images, masks = next(iter(DataLoader(stream, batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.long
    assert set(masks.unique().tolist()) <= {0, 3, 12, 255}
    assert images.mean().abs() < 2 and images.std() > 0.1  # normalized, not [0, 255]
    assert stream.config is stream.source.config and stream.config.image_size == (64, 64)
    assert stream.config.generator.batch_size == fast["generator"].batch_size


def test_same_seed_same_sequence_other_seed_differs(tiny_sd1, fast):
    a = collect(DiffuMaskStream(tiny_sd1, ["dog"], seed=1, num_samples=6, **fast))
    b = collect(DiffuMaskStream(tiny_sd1, ["dog"], seed=1, num_samples=6, **fast))
    c = collect(DiffuMaskStream(tiny_sd1, ["dog"], seed=2, num_samples=6, **fast))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not torch.allclose(a[0][0], c[0][0])


def test_stream_sample_i_is_dataset_item_i_whatever_workers_and_batch(tiny_sd1, fast):
    plain = dict(fast, augment=False)
    dataset = DiffuMaskDataset(tiny_sd1, ["bird", "dog"], length=8, **plain)
    items = [dataset[i] for i in range(8)]
    reference = ([x for x, _ in items], [y for _, y in items])
    one_worker = collect(DiffuMaskStream(tiny_sd1, ["bird", "dog"], num_samples=8, **plain))
    two_workers = collect(DiffuMaskStream(tiny_sd1, ["bird", "dog"], num_samples=8, **plain), num_workers=2)
    other_batch = dict(plain, generator=GeneratorConfig(num_inference_steps=3, batch_size=3))
    batch_of_3 = collect(DiffuMaskStream(tiny_sd1, ["bird", "dog"], num_samples=6, cache_size=6, **other_batch))
    for run in (one_worker, two_workers):
        assert same_samples(*run, *reference)
    assert same_samples(*batch_of_3, reference[0][:6], reference[1][:6])


def test_no_duplicates_across_two_workers(tiny_sd1, fast):
    images, _ = collect(DiffuMaskStream(tiny_sd1, ["dog"], num_samples=12, augment=False, **fast), num_workers=2)
    assert len(images) == 12
    for a, b in itertools.combinations(images, 2):
        assert not torch.allclose(a, b, atol=0.05)


def test_shards_draw_disjoint_indices(tiny_sd1, fast, monkeypatch):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], **fast)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(sharding, "split_by_node", lambda rank=rank: (rank, 2))
        shard_id, shards = sharding.shard()
        iterator = StreamIterator(stream, shard_id, shards)
        next(iterator)
        batch = fast["generator"].batch_size
        seen.append({entry.sample.index for entry in iterator.schedule.cache}
                    | {i for i in range(16) if (i // batch) % shards == shard_id})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(16))


def test_reuse_serves_each_sample_k_times_within_cache_bound(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], reuse=3, cache_size=8, augment=False, **fast)
    iterator = iter(stream)
    served, largest_cache = [], 0
    for _ in range(36):
        image, _ = next(iterator)
        served.append(image)
        largest_cache = max(largest_cache, len(iterator.schedule.cache))
    assert largest_cache <= 8
    generated = stream.stats()["accepted"]
    assert generated <= 36 // 3 + 8, "reuse must cut generation"
    counts = [sum(torch.equal(a, b) for b in served) for a in served]
    assert max(counts) == 3 and min(counts) >= 1


def test_reuse_gives_fresh_augmentation(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], reuse=4, cache_size=4, **fast)
    images = [image for image, _ in itertools.islice(iter(stream), 16)]
    assert stream.stats()["accepted"] == 4
    assert len({image.sum().item() for image in images}) > 12


def test_non_square(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], num_samples=2, **dict(fast, image_size=(64, 96)))
    images, masks = next(iter(DataLoader(stream, batch_size=2)))
    assert images.shape == (2, 3, 64, 96) and masks.shape == (2, 64, 96)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(classes=["dragon"]), "unknown class 'dragon'"),
        (dict(classes=[]), "classes is empty"),
        (dict(classes=["background"]), "'background' cannot be generated"),
        (dict(image_size=100), "image_size 100 is not a multiple of 8"),
        (dict(reuse=0), "reuse must be >= 1, got 0"),
        (dict(cache_size=0), "cache_size must be >= 1, got 0"),
        (dict(cache_size=2), r"cache_size \(2\) must be at least the generation batch_size \(4\)"),
        (dict(label_space=["dog", "background"]), "label_space\\[0\\] must be 'background'"),
    ],
)
def test_bad_input_fails_before_any_model_loads(options, message, fast):
    loaded = []
    kwargs = dict(fast, classes=["dog"])
    kwargs.update(options)
    with pytest.raises(ValueError, match=message):
        DiffuMaskStream(lambda: loaded.append(1), **kwargs)
    assert not loaded


def test_bad_model_folders(tmp_path, fast):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        DiffuMaskStream(str(tmp_path / "missing-model"), ["dog"], **fast)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        DiffuMaskDataset(tmp_path, ["dog"], length=2, **fast)


def test_resume_continues_the_sequence_without_regenerating_it(tiny_sd1, fast):
    def make():
        return DiffuMaskStream(tiny_sd1, ["dog", "bird"], reuse=2, cache_size=8, **fast)

    whole = [pair for pair in itertools.islice(iter(make()), 20)]
    first = make()
    iterator = iter(first)
    for _ in range(11):
        next(iterator)
    state = first.state_dict()
    assert {k: state[k] for k in ("served", "shard_id", "shards")} == {"served": 11, "shard_id": 0, "shards": 1}
    assert state["fingerprint"] == make().fingerprint, "the same settings give the same fingerprint"
    resumed = make()
    resumed.load_state_dict(state)
    rest = [pair for pair in itertools.islice(iter(resumed), 9)]
    assert resumed.stats()["accepted"] <= 8, "only the cached samples are generated again"
    for (image, mask), (want_image, want_mask) in zip(rest, whole[11:]):
        assert torch.equal(mask, want_mask) and torch.allclose(image, want_image, atol=0.02)


def test_resume_with_other_sharding_is_refused(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], **fast)
    with pytest.raises(ValueError, match="saved by shard 1 of 2"):
        stream.load_state_dict({**stream.state_dict(), "served": 3, "shard_id": 1, "shards": 2})


# (what the resumed stream changes, a field its refusal names)
OTHER_SETTINGS = [
    (dict(seed=1), "seed: 0 -> 1"),
    (dict(classes=["bird", "dog"]), r"classes: \['dog', 'bird'\] -> \['bird', 'dog'\]"),
    (dict(reuse=3), "reuse: 2 -> 3"),
    (dict(cache_size=12), "cache_size: 8 -> 12"),
    (dict(generator=GeneratorConfig(num_inference_steps=3, batch_size=2)), "generator.batch_size: 4 -> 2"),
    (dict(generator=GeneratorConfig(num_inference_steps=2, batch_size=4)), "generator.num_inference_steps: 3 -> 2"),
    (dict(mask={"threshold": 0.3}), "mask.threshold: 0.4 -> 0.3"),
    (dict(image_size=32), r"image_size: \[64, 64\] -> \[32, 32\]"),
    (dict(vocabulary={"templates": ["a drawing of a {class}"]}), "vocabulary: '"),
    (dict(model="random-weights"), "model: 'folder:"),
    (dict(augment=False), "augment: True -> False"),
    (dict(transforms=lambda image, mask: (image, mask)), "transforms: .ondemand_seg.data.transforms.Segmentation"),
    # The same transform class with other parameters serves other crops.
    (dict(transforms=SegmentationTransform(64, train=False)), r"transforms: .*RandomResizedC.* -> .*Compose\(\[ Resize\(p"),
]


@pytest.mark.parametrize("change, named", OTHER_SETTINGS, ids=[",".join(c) for c, _ in OTHER_SETTINGS])
def test_resume_under_other_settings_is_refused_naming_what_changed(tiny_sd1, fast, change, named):
    settings = dict(model=tiny_sd1, classes=["dog", "bird"], reuse=2, cache_size=8, **fast)
    saved = DiffuMaskStream(**settings)
    state = saved.state_dict()
    assert state["served"] == 0 and state["fingerprint"] == saved.fingerprint, "a fresh stream's state is complete"
    other = DiffuMaskStream(**{**settings, **change})
    with pytest.raises(ValueError, match=f"saved under other settings.*{named}"):
        other.load_state_dict(state)


def test_settings_that_change_only_speed_or_the_model_folders_place_resume(tiny_sd1, fast, tmp_path):
    import shutil

    settings = dict(classes=["dog"], **fast)
    state = DiffuMaskStream(tiny_sd1, **settings).state_dict()
    moved = shutil.copytree(tiny_sd1, tmp_path / "moved")
    DiffuMaskStream(moved, **settings).load_state_dict(state)
    speed = dict(settings, generator=GeneratorConfig(num_inference_steps=3, batch_size=4, channels_last=True),
                 quality={"max_consecutive_rejects": 7})
    DiffuMaskStream(tiny_sd1, **speed).load_state_dict(state)
    weights = moved / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one weight's last byte: retrained weights of the same shapes
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model: 'folder:"):
        DiffuMaskStream(moved, **settings).load_state_dict(state)


def test_an_edit_behind_a_symlinked_component_folder_changes_the_model_fingerprint(tiny_sd1, tmp_path):
    """A component linked from a shared cache is read through its link: its weights count."""
    import shutil

    from ondemand_seg.data.fingerprint import model_fingerprint

    linked = shutil.copytree(tiny_sd1, tmp_path / "linked")
    shutil.move(linked / "unet", tmp_path / "shared-unet")
    (linked / "unet").symlink_to(tmp_path / "shared-unet", target_is_directory=True)
    (tmp_path / "shared-unet" / "loop").symlink_to(linked, target_is_directory=True)  # walked once, not forever
    before = model_fingerprint(linked)
    assert before == model_fingerprint(tiny_sd1), "the same files through a link: the same model"
    weights = tmp_path / "shared-unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(linked) != before


@pytest.mark.parametrize("change, message", [
    (dict(served=-1), "served must be >= 0, got -1"),
    (dict(served=2.0), r"served must be an int, got 2.0 \(float\)"),
    (dict(served="3"), r"served must be an int, got '3' \(str\)"),
    (dict(served=True), r"served must be an int, got True \(bool\)"),
    (dict(served=None), r"served must be an int, got None"),
    (dict(shard_id=2, shards=2), "shard_id 2 is not below its shards 2"),
    (dict(shards=0), "shards must be >= 1, got 0"),
    (dict(fingerprint="abc"), "fingerprint must be a dict, got str"),
    (dict(served=10**9), "served 1000000000 is more than a resume replays"),
    (dict(plan={"base": 0, "carried": [[1, -1]], "served": 0}), "plan carried must be a list"),
    (dict(plan={"base": 100, "carried": [[0, 0], [0, 0]], "served": 0}), r"carries index\(es\) \[0\] more than once"),
    (dict(plan={"base": 100, "carried": [[5, 2]], "served": 0}), r"carries \[\[5, 2\]\] .* already served reuse=1 times"),
])
def test_malformed_stream_states_are_refused(tiny_sd1, fast, change, message):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], **fast)
    with pytest.raises(ValueError, match=message):
        stream.load_state_dict({**stream.state_dict(), **change})
    for key in ("served", "fingerprint"):
        state = stream.state_dict()
        del state[key]
        with pytest.raises(ValueError, match=f"stream state lacks {key}"):
            stream.load_state_dict(state)
    with pytest.raises(TypeError, match="must be a dict"):
        stream.load_state_dict([("served", 1)])


def test_splicing_transform_gets_other_cached_samples(tiny_sd1, fast):
    from ondemand_seg import AugmentConfig, DiffuMaskAugment

    always = AugmentConfig.off()
    always.splice, always.splice_max = 1.0, 2
    stream = DiffuMaskStream(tiny_sd1, ["dog", "bird"], reuse=2, cache_size=8,
                             transforms=DiffuMaskAugment(64, always), **dict(fast, mask=None))
    plain = DiffuMaskStream(tiny_sd1, ["dog", "bird"], reuse=2, cache_size=8, augment=False, **fast)
    spliced = [m for _, m in itertools.islice(iter(stream), 6)]
    whole = [m for _, m in itertools.islice(iter(plain), 6)]
    assert any(not torch.equal(a, b) for a, b in zip(spliced, whole))
    again = [m for _, m in itertools.islice(iter(DiffuMaskStream(tiny_sd1, ["dog", "bird"], reuse=2, cache_size=8,
                                                                  transforms=DiffuMaskAugment(64, always), **dict(fast, mask=None))), 6)]
    assert all(torch.equal(a, b) for a, b in zip(spliced, again))


def test_vocabulary_prompts_and_zero_shot_classes(tiny_sd1, fast):
    dataset = DiffuMaskDataset(tiny_sd1, ["bird", "tugboat"], length=12, vocabulary="voc", **fast)
    assert dataset.source.label_space[-1] == "tugboat" and dataset.source.class_ids == [3, 21]
    prompts = [dataset.source.prompt(i).text for i in range(12)]
    assert len(set(prompts)) > 4, "templates, synonyms and sub-classes vary per image"
    assert any("tugboat" in p for p in prompts)
    sample = dataset.raw([0])[0]
    assert set(np.unique(sample.mask).tolist()) <= {0, 3, 21, 255}


def test_splice_partners_are_picked_from_the_seed_alone():
    blank = np.zeros((2, 2, 3), np.uint8)
    samples = [RawSample(blank, blank[..., 0], "", i, 0) for i in range(7)]
    candidates = samples[1:]
    picks = splice_partners(samples[0], candidates, seed=5)
    assert len(picks) == 3 and len({id(p) for p in picks}) == 3 and all(p in candidates for p in picks)
    assert splice_partners(samples[0], list(candidates), seed=5) == picks
    assert candidates == samples[1:], "the candidates are left as they were"
    assert len({tuple(p.index for p in splice_partners(samples[0], candidates, seed)) for seed in range(10)}) > 1
    assert [p.index for p in splice_partners(samples[0], candidates[:2], seed=5, count=3)] in ([1, 2], [2, 1])
    assert len(splice_partners(samples[0], candidates, seed=5, count=5)) == 5


def test_a_run_moves_from_two_workers_to_three_serving_nothing_twice_and_skipping_nothing():
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ondemand_seg import DiffuMaskGenerator, GeneratorConfig
    from ondemand_seg.data.schedule import ServingPlan
    from ondemand_seg.data.stream import find_stream_states

    settings = dict(generator=GeneratorConfig(num_inference_steps=2, batch_size=2), seed=5)
    reference = DiffuMaskGenerator("toy", ["ring", "circle"], **settings).samples(range(24))
    index_of = {sample.mask.tobytes() + sample.image.tobytes(): sample.index for sample in reference}

    def make():
        return DiffuMaskStream("toy", ["ring", "circle"], cache_size=2, transforms=lambda image, mask: (image, mask),
                               **settings)

    def served(loader, count):
        items = []
        for image, mask in loader:
            items.append(index_of[np.asarray(mask).tobytes() + np.asarray(image).tobytes()])
            if len(items) == count:
                return items

    first = StatefulDataLoader(make(), batch_size=None, num_workers=2)
    seen = served(first, 5)
    states = find_stream_states(first.state_dict())
    assert sorted(s["shard_id"] for s in states) == [0, 1] and sum(s["served"] for s in states) == 5
    second_stream = make()
    second_stream.load_state_dict(second_stream.resharded_state(states))
    second = StatefulDataLoader(second_stream, batch_size=None, num_workers=3)
    seen += served(second, 7)
    assert len(seen) == len(set(seen)), f"an index was served twice: {seen}"
    plan = ServingPlan.from_dict(make().resharded_state(find_stream_states(second.state_dict()))["plan"])
    unserved = {index for index, _ in plan.carried}
    assert set(range(plan.base)) == set(seen) | unserved and not set(seen) & unserved, "an index was skipped"
    with pytest.raises(ValueError, match="saved by shard 0 of 2, but this process is shard 0 of 1.*resharded_state"):
        make().load_state_dict(states[0])


def test_a_state_serving_more_than_the_pass_holds_is_refused(tiny_sd1, fast):
    stream = DiffuMaskStream(tiny_sd1, ["dog"], num_samples=4, **fast)
    with pytest.raises(ValueError, match=r"served 100 is more than this shard serves in a pass \(4 of num_samples=4\)"):
        stream.load_state_dict({**stream.state_dict(), "served": 100})


def test_callables_are_told_apart_by_their_arguments():
    import functools

    from ondemand_seg.data.fingerprint import model_fingerprint
    from ondemand_seg.pipelines.tiny import build_tiny_pipeline

    sd1, sd2 = functools.partial(build_tiny_pipeline, "sd1"), functools.partial(build_tiny_pipeline, "sd2")
    assert model_fingerprint(sd1) != model_fingerprint(sd2)
    assert model_fingerprint(sd1) == "callable:ondemand_seg.pipelines.tiny.build_tiny_pipeline('sd1')"


def test_a_copied_stream_keeps_its_position_and_counts_on_its_own(tiny_sd1, fast):
    import copy
    import pickle

    def make():
        return DiffuMaskStream(tiny_sd1, ["dog"], reuse=1, cache_size=4, num_samples=6, augment=False, **fast)

    whole = list(make())
    stream = make()
    iterator = iter(stream)
    next(iterator)
    for clone in (copy.deepcopy(stream), pickle.loads(pickle.dumps(stream))):
        assert clone.state_dict()["served"] == 1
        rest = list(clone._iterator)
        assert len(rest) == 5 and all(torch.equal(m, w[1]) for (_, m), w in zip(rest, whole[1:]))
    assert stream.stats()["generated"] == 4, "the copies generated on their own counts"


def test_file_digest_reads_little_of_a_file_whose_safetensors_header_length_is_corrupt(tmp_path):
    import tracemalloc

    from ondemand_seg.data.fingerprint import file_digest, files_digest

    big = tmp_path / "model.safetensors"
    with open(big, "wb") as file:
        file.write((2**60).to_bytes(8, "little"))
        file.truncate(300 * 2**20)  # sparse: past the whole-file limit, so hashed by windows
    tracemalloc.start()
    try:
        file_digest(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"read {peak / 2**20:.0f} MiB at once"
    with pytest.raises(TypeError, match="files must be a sequence of paths, got one path"):
        files_digest(str(big))  # a string is not iterated as one-character paths
