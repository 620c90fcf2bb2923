import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)

from ondemand_seg import GeneratorConfig, MaskConfig
from ondemand_seg.generation import capture
from ondemand_seg.generation.capture import (
    AttentionStore,
    CapturedAttention,
    CrossAttentionCaptureProcessor,
    class_mass,
    install_capture,
    record_joint,
)
from ondemand_seg.generation.generator import CapturingPipeline
from ondemand_seg.pipelines.builtin import TOY_MODEL
from ondemand_seg.pipelines.families import family_of
from ondemand_seg.pipelines.loading import load_pipeline
from ondemand_seg.pipelines.tiny import build_tiny_pipeline
from ondemand_seg.settings.vocabulary import PromptSpec

SD = family_of("StableDiffusionPipeline")


class ReferenceProcessor(AttnProcessor):
    """diffusers' stock non-fused processor, also keeping its cross-attention probabilities."""

    def __init__(self, records):
        self.records = records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            self.records.append((attn.get_attention_scores(query, key), attn.heads))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def unet_inputs(images=2, tokens=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2 * images, 4, 8, 8, generator=g)
    text = torch.randn(2 * images, tokens, 32, generator=g)  # [uncond; cond]
    return latents, text


def test_install_capture_routes_cross_attention_only():
    unet = build_tiny_pipeline().unet
    store = AttentionStore()
    captured = install_capture(unet, store, SD)
    processors = unet.attn_processors
    assert set(captured) == {n for n in processors if n.endswith("attn2.processor")}
    assert len(captured) == 10  # 3 down, 1 mid, 6 up (two per up block) transformer blocks
    for name, proc in processors.items():
        expected = CrossAttentionCaptureProcessor if name in captured else AttnProcessor2_0
        assert type(proc) is expected, name


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
def test_capture_matches_reference_probabilities_of_chosen_tokens_conditional_half(kernel):
    torch.manual_seed(0)
    unet = build_tiny_pipeline().unet.eval()
    latents, text = unet_inputs(images=2)
    weights = torch.zeros(2, 2, 77)
    weights[0, 0, 4] = 1  # image 0: one single-token class
    weights[1, 0, [4, 5]] = 1  # image 1: a two-token class ...
    weights[1, 1, 7] = 1  # ... and a second class

    records = []
    unet.set_attn_processor({n: ReferenceProcessor(records) if n.endswith("attn2.processor") else AttnProcessor()
                             for n in unet.attn_processors})
    with torch.no_grad():
        reference_out = unet(latents, 10, encoder_hidden_states=text).sample
    expected: dict[int, list[torch.Tensor]] = {}
    for probs, heads in records:
        cond = probs.view(4, heads, *probs.shape[1:])[2:]  # conditional half
        maps = torch.einsum("bhnt,bkt->bkn", cond, weights) / heads
        expected.setdefault(maps.shape[-1], []).append(maps)

    store = AttentionStore(kernel=kernel)
    install_capture(unet, store, SD)
    store.begin(weights, (8, 8), num_steps=1)
    with torch.no_grad():
        captured_out = unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.allclose(captured_out, reference_out, atol=1e-5), "capture must not change the UNet output"
    got = store.maps()
    assert sorted(got) == [1, 2, 4]
    for factor, maps in got.items():
        side = 8 // factor
        want = torch.stack(expected[side * side]).mean(0).view(2, 2, side, side)
        assert torch.allclose(maps, want, atol=1e-5), factor
    assert store.counts == {1: 3, 2: 3, 4: 4}  # per factor: one down, two up (and the mid block at 2x2)
    assert got[1][0, 1].abs().max() == 0, "unused class slot stays empty"


def test_store_memory_constant_in_steps_and_window_respected():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    store = AttentionStore()
    install_capture(pipe.unet, store, SD)
    weights = torch.zeros(1, 1, 77)
    weights[0, 0, 4] = 1
    sizes, counts = {}, {}
    for steps, window in [(2, (0.0, 1.0)), (10, (0.0, 1.0)), (10, (0.5, 1.0))]:
        store.begin(weights, (8, 8), steps, window)
        pipe("a photograph of a dog", height=64, width=64, num_inference_steps=steps, output_type="pt",
             callback_on_step_end=store.on_step_end)
        sizes[steps, window] = store.memory_bytes()
        counts[steps, window] = dict(store.counts)
    assert sizes[2, (0.0, 1.0)] == sizes[10, (0.0, 1.0)] > 0
    assert counts[10, (0.0, 1.0)] == {f: 5 * c for f, c in counts[2, (0.0, 1.0)].items()}
    assert counts[10, (0.5, 1.0)] == {f: c // 2 for f, c in counts[10, (0.0, 1.0)].items()}


def test_store_outside_window_records_nothing():
    store = AttentionStore()
    store.begin(torch.ones(1, 1, 77), (8, 8), num_steps=4, timestep_window=(0.5, 1.0))
    assert not store.recording
    store.on_step_end(None, 1, 0, {})
    assert store.recording
    store.reset()
    assert not store.recording and store.memory_bytes() == 0


def test_factor_of_non_square_latent():
    store = AttentionStore()
    store.begin(torch.ones(1, 1, 77), (8, 12), num_steps=1)
    assert [store.factor_of(n) for n in (96, 24, 6)] == [1, 2, 4]


class SelfReferenceProcessor(AttnProcessor):
    """Stock non-fused processor keeping self-attention probabilities."""

    def __init__(self, records):
        self.records = records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(hidden_states))
        self.records.append((attn.get_attention_scores(query, key), attn.heads))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_self_attention_is_recorded_only_at_its_factor_when_asked():
    unet = build_tiny_pipeline().unet.eval()
    latents, text = unet_inputs(images=2)
    records = []
    unet.set_attn_processor({n: SelfReferenceProcessor(records) if n.endswith("attn1.processor") else AttnProcessor()
                             for n in unet.attn_processors})
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=text)
    at_factor_2 = [p.view(4, h, *p.shape[1:])[2:].mean(1) for p, h in records if p.shape[-1] == 16]
    want = torch.stack(at_factor_2).mean(0)

    store = AttentionStore()
    store.self_attention_factor = 2
    install_capture(unet, store, SD, self_attention=True)
    store.begin(torch.ones(2, 1, 77), (8, 8), num_steps=1)
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=text)
    got = store.self_attention()
    assert got.shape == (2, 16, 16) and store.self_count == len(at_factor_2) == 3
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2, 16), atol=1e-5)


def test_captured_holds_the_batch_detached_from_the_store():
    unet = build_tiny_pipeline().unet.eval()
    latents, text = unet_inputs(images=2)
    store = AttentionStore()
    store.self_attention_factor = 2
    install_capture(unet, store, SD, self_attention=True)
    store.begin(torch.rand(2, 1, 77).round(), (8, 8), num_steps=1)
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=text)
    captured = store.captured()
    assert isinstance(captured, CapturedAttention)
    maps = store.maps()
    assert sorted(captured.maps) == sorted(maps) == [1, 2, 4]
    assert all(torch.equal(captured.maps[f], maps[f]) for f in maps)
    assert torch.equal(captured.self_attention, store.self_attention()) and captured.self_attention.shape == (2, 16, 16)
    assert captured.self_attention_factor == 2 and captured.latent_size == (8, 8)
    # The tiny UNet has self-attention in every transformer block, so at every factor.
    assert captured.self_attention_factors_seen == {1, 2, 4}
    store.reset()
    store.self_attention_factors_seen.add(8)
    assert captured.self_attention_factors_seen == {1, 2, 4}, "the captured set is a copy"
    assert sorted(captured.maps) == [1, 2, 4] and captured.self_attention is not None, "reset leaves what was captured"
    assert store.captured().maps == {} and store.captured().self_attention is None


def test_captured_without_self_attention_asked():
    store = AttentionStore()
    store.begin(torch.ones(1, 1, 77), (4, 6), num_steps=1)
    store.add(torch.ones(1, 1, 24))
    captured = store.captured()
    assert captured.self_attention is None and captured.self_attention_factor is None
    assert captured.self_attention_factors_seen == set() and captured.latent_size == (4, 6)
    assert captured.maps[1].shape == (1, 1, 4, 6)


def test_self_attention_refinement_on_a_unet_without_self_attention_fails_early():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                cross_attention_dim=32, attention_head_dim=8, only_cross_attention=True, mid_block_type=None)
    with pytest.raises(ValueError, match="needs self-attention layers, and this model has none"):
        install_capture(unet, AttentionStore(), SD, self_attention=True)
    assert install_capture(unet, AttentionStore(), SD)  # without refinement the same UNet is fine


def test_missing_self_attention_factor_names_the_factors_that_exist():
    # The toy model's full-resolution block is cross-attention only; self-attention runs at 2 and 4.
    pipe = load_pipeline(TOY_MODEL, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    prompt = PromptSpec("a photo of a circle", ("circle",), (1,), ("circle",))
    # Named when the sampler is built (first load), from the UNet's config, before any generation.
    with pytest.raises(ValueError, match=r"self_attention_factor=1: .* self-attention runs at factor\(s\) \[2, 4\]"):
        CapturingPipeline(pipe, MaskConfig(self_attention_factor=1), GeneratorConfig(num_inference_steps=2))
    sampler = CapturingPipeline(pipe, MaskConfig(self_attention_factor=2), GeneratorConfig(num_inference_steps=2))
    assert sampler.generate([prompt], [0], (32, 32)).masks.shape == (1, 32, 32)
    assert sampler.store.self_attention_factors_seen == {2, 4}  # what the config said is what ran


def large_tokens(count, lead, seed):
    """``[1, count, 8]`` float16 tokens: ``lead`` in the first channel, N(0, 1) in the rest, so
    q·kᵀ of two such sets is ``lead_q * lead_k`` (past float16's 65504) plus an O(1) part that
    decides the softmax."""
    rest = torch.randn(1, count, 7, generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((1, count, 1), float(lead)), rest], dim=-1).half()


def identity_attention(dtype, cross=True):
    """A one-head diffusers attention layer with identity q/k/v/out projections (so float16 and
    float32 see the same q and k), upcasting its scores as SD 2.x does."""
    attn = Attention(8, cross_attention_dim=8 if cross else None, heads=1, dim_head=8, upcast_attention=True)
    with torch.no_grad():
        for projection in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            projection.weight.copy_(torch.eye(8))
    return attn.to(dtype)


def recorded(dtype, hidden, text=None, kernel="auto"):
    """What the capture processor records (class maps, self-attention) and returns on ``hidden``."""
    store = AttentionStore(kernel=kernel)
    store.self_attention_factor = None if text is not None else 1
    weights = torch.zeros(1, 2, 5)
    weights[0, 0, 1] = weights[0, 1, [2, 3]] = 1
    store.begin(weights, (2, 2), num_steps=1)
    attn = identity_attention(dtype, cross=text is not None)
    args = (hidden.to(dtype),) if text is None else (hidden.to(dtype), text.to(dtype))
    with torch.no_grad():
        out = CrossAttentionCaptureProcessor(store)(attn, *args)
        stock = attn.processor(attn, *args)
    return store, out, stock


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
def test_half_precision_scores_do_not_overflow_the_recorded_maps(kernel):
    hidden, text = large_tokens(4, 256, seed=0), large_tokens(5, 300, seed=1)
    assert torch.isinf(hidden[0] @ text[0].T).all(), "premise: q·kᵀ overflows when computed in float16"
    half, out, stock = recorded(torch.float16, hidden, text, kernel)
    reference, _, _ = recorded(torch.float32, hidden.float(), text.float(), kernel)
    maps, want = half.maps()[1], reference.maps()[1]
    assert torch.isfinite(maps).all() and maps.dtype == torch.float32
    assert 0.05 < want.max() < 0.95, "premise: the maps are not one-hot, so a match means something"
    assert torch.allclose(maps, want, atol=1e-5)
    assert out.dtype == torch.float16 and torch.equal(out, stock), "the layer's own output path is unchanged"


def test_half_precision_self_attention_does_not_overflow():
    hidden = large_tokens(4, 256, seed=2)
    half, out, stock = recorded(torch.float16, hidden)
    reference, _, _ = recorded(torch.float32, hidden.float())
    assert half.self_count == 1 and torch.isfinite(half.self_attention()).all()
    assert torch.allclose(half.self_attention(), reference.self_attention(), atol=1e-5)
    assert torch.equal(out, stock)


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
@pytest.mark.parametrize("map_source, joint_softmax", [("attention", "all"), ("attention", "text"), ("output", "all")])
def test_half_precision_joint_attention_records_the_float32_maps(map_source, joint_softmax, kernel):
    # [1, heads=2, S=4 image + 5 text, D=8] with q·kᵀ past float16's range.
    query = torch.cat([large_tokens(9, 256, seed=3), large_tokens(9, 256, seed=4)])[None]
    key = torch.cat([large_tokens(9, 300, seed=5), large_tokens(9, 300, seed=6)])[None]
    output = torch.cat([large_tokens(9, 300, seed=7), large_tokens(9, 256, seed=8)])[None]
    maps = {}
    for dtype in (torch.float16, torch.float32):
        store = AttentionStore(map_source, joint_softmax, kernel)  # "all" always runs SDPA
        store.self_attention_factor = 1
        store.begin(torch.ones(1, 1, 5), (2, 2), num_steps=1)
        with torch.no_grad():
            record_joint(store, 8 ** -0.5, query.to(dtype), key.to(dtype), output.to(dtype), slice(4, 9), slice(0, 4))
        maps[dtype] = (store.maps()[1], store.self_attention())
    for half, full in zip(maps[torch.float16], maps[torch.float32]):
        assert torch.isfinite(half).all() and torch.allclose(half, full, atol=1e-5)


def reference_mass(query, key, weights, scale, mask=None):
    """``[B, K, N]`` class mass in float64 from the same (rounded) inputs."""
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    return torch.einsum("bhnm,bkm->bkn", scores.softmax(-1), weights.double()) / query.shape[1]


def mass_inputs(dtype, classes, joint, masked, lead=None, seed=0):
    """Random ``[2, heads=3, N=16, D=8]`` queries and keys, class weights over the text keys (the
    last 6 keys of a joint sequence of 16 image + 6 text keys), and a text mask hiding key 4 of
    image 1's text. With ``lead``, the first channel is ``lead`` everywhere: q·kᵀ is ``lead²``
    (past float16's range for 300) plus an O(1) part that decides the softmax."""
    g = torch.Generator().manual_seed(seed)
    texts, images = 6, 16
    keys = images + texts if joint else texts
    query, key = torch.randn(2, 3, images, 8, generator=g), torch.randn(2, 3, keys, 8, generator=g)
    if lead is not None:
        query[..., 0] = key[..., 0] = lead
    weights = torch.zeros(2, classes, keys)
    for k in range(classes):
        weights[:, k, keys - texts + k % texts] = 1
    weights[1, 0, keys - texts + 4] = 1  # image 1's class 0 also names the masked token
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, keys)
        mask[1, ..., keys - texts + 4] = -10000.0  # diffusers' additive text-mask value
    return query.to(dtype), key.to(dtype), weights, mask


@pytest.mark.parametrize("joint", [False, True], ids=["cross", "joint"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("classes", [3, 9])  # value width padded to 8 and to 16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_mass_kernels_agree(dtype, classes, masked, joint):
    query, key, weights, mask = mass_inputs(dtype, classes, joint, masked)
    scale = 8 ** -0.5
    want = reference_mass(query, key, weights, scale, mask)
    for kernel in ("explicit", "sdpa"):
        got = class_mass(query, key, weights, scale, mask, kernel=kernel)
        assert got.dtype == torch.float32 and got.shape == (2, classes, 16)
        assert torch.allclose(got.double(), want, atol=1e-5), kernel
    if masked:
        unmasked = class_mass(query, key, weights, scale, kernel="sdpa")
        assert not torch.allclose(got, unmasked, atol=1e-3), "premise: the mask changes the mass"
        assert torch.allclose(got[0], unmasked[0]), "image 0's text is not masked"


@pytest.mark.parametrize("joint", [False, True], ids=["cross", "joint"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_class_mass_kernels_stay_finite_in_half_precision(joint, masked):
    query, key, weights, mask = mass_inputs(torch.float16, 2, joint, masked, lead=300.0)
    assert torch.isinf(query[0, 0] @ key[0, 0].T).all(), "premise: q·kᵀ overflows when computed in float16"
    want = reference_mass(query, key, weights, 8 ** -0.5, None if mask is None else mask.half())
    assert 0.05 < want.max() < 0.95, "premise: the mass is not one-hot, so a match means something"
    got = {kernel: class_mass(query, key, weights, 8 ** -0.5, None if mask is None else mask.half(), kernel=kernel)
           for kernel in ("explicit", "sdpa")}
    assert all(torch.isfinite(m).all() for m in got.values())
    assert torch.allclose(got["explicit"], got["sdpa"], atol=1e-5)
    # float32 resolves scores of 90,000 to about 0.01, so the float64 reference is met to about 3e-4.
    assert all(torch.allclose(m.double(), want, atol=1e-3) for m in got.values())


def test_class_mass_kernel_choice(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    query, key, weights, _ = mass_inputs(torch.float32, 2, joint=False, masked=False)
    class_mass(query, key, weights, 1.0)
    assert calls == [], "auto: the explicit softmax on CPU"
    class_mass(query, key, weights, 1.0, kernel="sdpa")
    assert calls == [1], "a named kernel is the one run"
    class_mass(query, key, weights, 1.0, kernel="explicit")
    assert calls == [1]
    with pytest.raises(ValueError, match="class-mass kernel must be one of"):
        AttentionStore(kernel="flash")
    with pytest.raises(ValueError, match="class-mass kernel must be one of"):
        class_mass(query, key, weights, 1.0, kernel="flash")


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
def test_cross_attention_capture_honours_the_text_mask(kernel):
    # PixArt and Sana hand their cross-attention an additive [batch, 1, T] mask over padded text.
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g)  # [uncond; cond]
    mask = torch.zeros(2, 1, 5)
    mask[1, 0, 3] = -10000.0  # the conditional prompt's token 3 is padding
    weights = torch.zeros(1, 1, 5)
    weights[0, 0, [2, 3]] = 1
    attn = identity_attention(torch.float32)

    def maps(mask):
        store = AttentionStore(kernel=kernel)
        store.begin(weights, (2, 2), num_steps=1)
        with torch.no_grad():
            CrossAttentionCaptureProcessor(store)(attn, hidden, text, attention_mask=mask)
        return store.maps()[1].flatten(2)

    probs = (hidden[1] @ text[1].T * attn.scale + mask[1]).softmax(-1)
    assert probs[:, 3].max() < 1e-6, "premise: the mask hides token 3"
    assert torch.allclose(maps(mask)[0, 0], probs[:, 2], atol=1e-6)
    assert not torch.allclose(maps(None), maps(mask), atol=1e-3)


def test_capture_computes_nothing_outside_the_timestep_window(monkeypatch):
    calls = []
    monkeypatch.setattr(capture, "class_mass", lambda *a, **k: calls.append(a[0].shape[2]) or torch.zeros(
        a[2].shape[0], a[2].shape[1], a[0].shape[2]))
    unet = build_tiny_pipeline().unet.eval()
    latents, text = unet_inputs(images=1)
    store = AttentionStore()
    install_capture(unet, store, SD)
    store.begin(torch.ones(1, 1, 77), (8, 8), num_steps=2, timestep_window=(0.5, 1.0))
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=text)  # step 0: outside the window
        assert calls == [] and store.counts == {}
        store.on_step(0)
        unet(latents, 10, encoder_hidden_states=text)  # step 1: inside
    assert sorted(calls) == [4] * 4 + [16] * 3 + [64] * 3  # every cross-attention layer, the finest included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SDPA kernels need CUDA")
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_sdpa_class_mass_on_cuda_is_fused_and_finite_in_half_precision(masked):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # SD 1.5's finest cross-attention: 8 heads of 40 over 64x64 queries and 77 text keys; q·kᵀ is
    # 300² = 90,000 (past float16's 65,504) plus an O(1) part that decides the softmax.
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 8, 4096, 40, generator=g).half(), torch.randn(2, 8, 77, 40, generator=g).half()
    query[..., 0] = key[..., 0] = 300.0
    weights = torch.zeros(2, 3, 77)
    weights[:, 0, 2] = weights[:, 1, [4, 5]] = weights[:, 2, 7] = 1
    mask = torch.zeros(2, 1, 1, 77)
    mask[1, ..., 5] = -10000.0
    mask = mask if masked else None
    scale = 40 ** -0.5
    want = class_mass(query, key, weights, scale, mask, kernel="explicit")  # float32 on the CPU
    assert 0.05 < want.max() < 0.95, "premise: the mass is not one-hot, so a match means something"
    cuda = [t.cuda() if t is not None else None for t in (query, key, weights, mask)]
    assert torch.isinf(cuda[0][0, 0, :4] @ cuda[1][0, 0].T).all(), "premise: q·kᵀ overflows in float16"
    # Without the math fallback: a fused kernel must take the padded value width.
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = class_mass(*cuda[:3], scale, cuda[3], kernel="sdpa")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Float32 scores near 90,000 (about 0.01 apart) and the float16 result (5e-4 relative) on both
    # sides, against a mass of at most 0.08.
    assert torch.allclose(got.cpu(), want, atol=1e-3)


def test_per_head_store_keeps_each_layer_head_and_its_mean_is_the_plain_map():
    torch.manual_seed(0)
    unet = build_tiny_pipeline().unet.eval()
    latents, text = unet_inputs(images=2)
    weights = torch.zeros(2, 2, 77)
    weights[:, 0, 4] = 1
    weights[1, 1, 7] = 1
    stores = {"plain": AttentionStore(), "per head": AttentionStore(per_head=True)}
    for store in stores.values():
        install_capture(unet, store, SD)
        store.begin(weights, (8, 8), num_steps=1)
        with torch.no_grad():
            unet(latents, 10, encoder_hidden_states=text)
    plain, per_head = stores["plain"].captured(), stores["per head"].captured()
    assert plain.head_maps is None and sorted(per_head.head_maps) == [1, 2, 4]
    for factor, maps in per_head.head_maps.items():
        side = 8 // factor
        assert maps.shape[:2] == (2, 2) and maps.shape[3:] == (side, side)
        # Every layer of a factor has the same number of heads, so the mean over layer-heads is the
        # mean over layers of each layer's head mean: the plain store's map.
        assert torch.allclose(maps.mean(2), plain.maps[factor], atol=1e-6), factor
    assert stores["per head"].memory_bytes() > stores["plain"].memory_bytes()


def test_token_rescaling_at_capture_sums_rescaled_maps_over_heads():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    weights = torch.zeros(2, 1, 6)
    weights[:, 0, 2] = 1
    mass = capture.token_mass(query, key, 8**-0.5)
    assert mass.shape == (2, 3, 16, 6) and torch.allclose(mass.sum(-1), torch.ones(2, 3, 16), atol=1e-5)
    assert torch.allclose(mass[..., 2].mean(1), class_mass(query, key, weights, 8**-0.5)[:, 0], atol=1e-5)
    store = AttentionStore(rescaling="tokens")
    store.begin(weights, (4, 4), num_steps=1)
    store.record(query, key, weights, 8**-0.5)
    scaled = mass / mass.mean(2, keepdim=True)
    want = (scaled[..., 2] / scaled.sum(-1)).mean(1).view(2, 1, 4, 4)
    assert torch.allclose(store.maps()[1], want, atol=1e-5)
