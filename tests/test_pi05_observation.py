"""Observation handling of Pi05.sample_actions: camera order, missing cameras, masks, bad inputs."""
import dataclasses

import pytest
import torch

from quantvla_fx.models.pi05 import IMAGE_KEYS, Observation, Pi05, Pi05Config
from quantvla_fx.models.pi05.initialization import init_weights

STEPS = 2  # these tests compare runs with each other, not with openpi: 2 Euler steps suffice


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Pi05(Pi05Config.tiny()).eval()
    init_weights(m, std=0.2)  # large enough that images and tokens visibly move the actions
    return m


def _observation(batch=2, seed=1, prompt_len=16):
    g = torch.Generator().manual_seed(seed)
    images = {k: torch.rand(batch, 3, 224, 224, generator=g) * 2 - 1 for k in IMAGE_KEYS}
    mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
    mask[:, :5] = True
    return Observation(
        images=images,
        image_masks={k: torch.ones(batch, dtype=torch.bool) for k in IMAGE_KEYS},
        state=torch.zeros(batch, 32),
        tokenized_prompt=torch.randint(0, 1024, (batch, prompt_len), generator=g),
        tokenized_prompt_mask=mask,
    )


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))


def _act(model, obs, noise):
    return model.sample_actions(obs, noise=noise, num_steps=STEPS)


def test_missing_camera_is_a_masked_zero_image(model, noise):
    obs = _observation()
    explicit = dataclasses.replace(
        obs,
        images=dict(obs.images, right_wrist_0_rgb=torch.zeros(2, 3, 224, 224)),
        image_masks=dict(obs.image_masks, right_wrist_0_rgb=torch.zeros(2, dtype=torch.bool)),
    )
    missing = dataclasses.replace(
        obs,
        images={k: v for k, v in obs.images.items() if k != "right_wrist_0_rgb"},
        image_masks={k: v for k, v in obs.image_masks.items() if k != "right_wrist_0_rgb"},
    )
    torch.testing.assert_close(_act(model, missing, noise), _act(model, explicit, noise), rtol=0, atol=0)
    assert not torch.equal(_act(model, missing, noise), _act(model, obs, noise))


def test_masked_camera_content_is_ignored_but_unmasked_is_not(model, noise):
    obs = _observation()
    masks = dict(obs.image_masks, left_wrist_0_rgb=torch.tensor([True, False]))
    base = dataclasses.replace(obs, image_masks=masks)
    other_image = dataclasses.replace(base, images=dict(obs.images, left_wrist_0_rgb=-obs.images["left_wrist_0_rgb"]))
    a, b = _act(model, base, noise), _act(model, other_image, noise)
    assert (a[0] - b[0]).abs().max() > 1e-3  # sample 0 sees the camera
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)  # sample 1 has it masked


def test_missing_mask_means_valid(model, noise):
    obs = _observation()
    no_masks = dataclasses.replace(obs, image_masks={})
    torch.testing.assert_close(_act(model, no_masks, noise), _act(model, obs, noise), rtol=0, atol=0)


def test_dict_order_does_not_matter_and_channels_last_is_accepted(model, noise):
    obs = _observation()
    reordered = dataclasses.replace(obs, images={k: obs.images[k].permute(0, 2, 3, 1) for k in reversed(IMAGE_KEYS)})
    torch.testing.assert_close(_act(model, reordered, noise), _act(model, obs, noise), rtol=0, atol=1e-6)


def test_padded_prompt_tokens_are_ignored(model, noise):
    obs = _observation()
    tokens = obs.tokenized_prompt.clone()
    tokens[:, 5:] = (tokens[:, 5:] + 1) % 1024  # only padded positions change
    changed = dataclasses.replace(obs, tokenized_prompt=tokens)
    torch.testing.assert_close(_act(model, changed, noise), _act(model, obs, noise), rtol=0, atol=1e-6)
    tokens[:, 4] = (tokens[:, 4] + 1) % 1024  # a valid position
    assert not torch.allclose(_act(model, changed, noise), _act(model, obs, noise), atol=1e-4)


def test_sampled_noise_and_default_steps(model):
    obs = _observation()
    actions = model.sample_actions(obs)
    assert actions.shape == (2, 10, 32) and actions.dtype == torch.float32 and torch.isfinite(actions).all()


def test_positional_and_openpi_call_forms(model, noise):
    obs = _observation()
    ref = _act(model, obs, noise)
    torch.testing.assert_close(model.sample_actions(obs, noise, STEPS), ref, rtol=0, atol=0)
    torch.testing.assert_close(model.sample_actions("cpu", obs, noise=noise, num_steps=STEPS), ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="noise both positionally and as a keyword"):
        model.sample_actions(obs, noise, noise=noise)
    with pytest.raises(TypeError, match="needs an Observation"):
        model.sample_actions(noise)


@pytest.mark.parametrize("edit,message", [
    (lambda o: {"images": dict(o.images, wrist=o.images["base_0_rgb"])}, r"unknown camera key\(s\) \['wrist'\]"),
    (lambda o: {"images": dict(o.images, left_wrist_0_rgb=torch.zeros(2, 3, 112, 112))},
     r"images\['left_wrist_0_rgb'\] is 112x112 \(shape \(2, 3, 112, 112\)\); resizing is not implemented"),
    (lambda o: {"images": dict(o.images, base_0_rgb=torch.zeros(2, 224, 224, 3, dtype=torch.uint8))},
     r"images\['base_0_rgb'\] has dtype torch.uint8"),
    (lambda o: {"images": dict(o.images, base_0_rgb=torch.zeros(2, 4, 224, 224))}, "no 3-channel axis"),
    (lambda o: {"image_masks": dict(o.image_masks, base_0_rgb=torch.ones(3, dtype=torch.bool))},
     r"image_masks\['base_0_rgb'\] must have shape \(2,\)"),
    (lambda o: {"tokenized_prompt_mask": o.tokenized_prompt_mask[:, :3]}, "tokenized_prompt_mask shape"),
])
def test_bad_observations_are_named(model, noise, edit, message):
    obs = _observation()
    with pytest.raises(ValueError, match=message):
        model.sample_actions(dataclasses.replace(obs, **edit(obs)), noise=noise)


def test_bad_noise_and_steps(model):
    obs = _observation()
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 10, 32\)"):
        model.sample_actions(obs, noise=torch.zeros(2, 50, 32))
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        model.sample_actions(obs, num_steps=0)


def test_from_dict_converts_uint8_like_openpi():
    image = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    obs = Observation.from_dict({
        "image": {"base_0_rgb": image},
        "image_mask": {"base_0_rgb": torch.tensor([True])},
        "state": torch.zeros(1, 8),
        "tokenized_prompt": torch.zeros(1, 4, dtype=torch.long),
        "tokenized_prompt_mask": torch.ones(1, 4, dtype=torch.bool),
    })
    assert obs.images["base_0_rgb"].dtype == torch.float32
    assert obs.images["base_0_rgb"][0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])
    with pytest.raises(KeyError, match="tokenized_prompt"):
        Observation.from_dict({"image": {}})


def test_jittered_moves_only_the_images_reproducibly():
    import torch

    from quantvla_fx.models.pi05 import Pi05Config
    from quantvla_fx.models.pi05.observation import jittered, random_observation

    obs = random_observation(Pi05Config.tiny(), 1, "cpu")
    a, b, c = jittered(obs, 3), jittered(obs, 3), jittered(obs, 4)
    for k, v in obs.images.items():
        assert torch.equal(a.images[k], b.images[k]) and not torch.equal(a.images[k], c.images[k])
        assert not torch.equal(a.images[k], v) and a.images[k].abs().max() <= 1.0
        assert (a.images[k] - v).abs().max() <= 0.1 * 6  # amount x a few sigma
    assert a.tokenized_prompt is obs.tokenized_prompt and a.image_masks is obs.image_masks
