"""Tokenizer modules: shapes, block-causality, the quantize round trip, overfitting a batch, LPIPS."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.tokenizers import (
    CNNConfig,
    CNNTokenizer,
    MAEConfig,
    MAETokenizer,
    QuantizeConfig,
    QuantizeTokenizer,
    build_tokenizer,
    decoder_mask,
    encoder_mask,
    mask_ratio_at,
    pixels,
    reconstruction_loss,
)
from pipeline.image_metrics import LpipsUnavailable, load_lpips, psnr, to_images

SMALL_MAE = dict(image_size=16, channels=3, patch_size=4, n_latents=4, latent_dim=8, dim=32, heads=2,
                 depth=2, decoder_depth=2, max_frames=4)
SMALL_CNN = dict(image_size=16, channels=3, latent_size=8, latent_channels=4, width=16, blocks=1)


def blobs(b: int, t: int, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """(b, t, C, size, size) frames in [0, 1]: smooth random colour fields scrolling one pixel a frame."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, channels, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return torch.stack([img.roll(s, dims=-1) for s in range(t)], dim=1)


@pytest.mark.parametrize(
    "kind,config,latent_shape,dtype",
    [
        ("quantize", dict(image_size=16, channels=3, size=8, levels=16), (8, 8), torch.uint8),
        ("cnn", SMALL_CNN, (8, 8, 4), torch.float16),
        ("mae", SMALL_MAE, (4, 8), torch.float16),
    ],
)
def test_shapes(kind, config, latent_shape, dtype):
    model = build_tokenizer(kind, **config)
    x = blobs(2, 3)
    z = model.encode(x)
    assert tuple(z.shape) == (2, 3, *latent_shape) == (2, 3, *model.latent_shape)
    assert model.latent_dtype == dtype
    assert model.decode(z).shape == x.shape
    assert model(x).shape == x.shape


def test_build_rejects_unknown_kind_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'vqvae'"):
        build_tokenizer("vqvae")
    for bad in (6, 16, 0):
        with pytest.raises(ValueError, match=f"latent_size {bad} must be image_size 16 / 2"):
            CNNTokenizer(CNNConfig(image_size=16, latent_size=bad))
    with pytest.raises(ValueError, match="patch_size 5 must divide image_size 16"):
        MAETokenizer(MAEConfig(image_size=16, patch_size=5))
    with pytest.raises(ValueError, match="more than max_frames=4"):
        MAETokenizer(MAEConfig(**SMALL_MAE)).encode(blobs(1, 5))


def test_pixels_converts_stored_frames():
    frames = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8)
    x = pixels(frames)
    assert x.shape == (2, 3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[1, 2, 0], frames[1, 2, :, :, 0].float() / 255)


# -- quantize ------------------------------------------------------------------------------------


def test_quantize_round_trip_and_vocabulary():
    q = QuantizeTokenizer(QuantizeConfig(image_size=8, channels=1, size=8, levels=16))
    assert q.vocab_size == 17 and q.mask_id == 16
    ids = torch.randint(0, 16, (2, 3, 8, 8), dtype=torch.uint8)
    # ids -> dequantized image -> ids is exact
    assert torch.equal(q.encode(q.decode(ids)), ids)
    # black and white are exact; a ramp covers every level in order
    assert torch.equal(q.dequantize(torch.tensor([0, 15])), torch.tensor([0.0, 1.0]))
    x = torch.linspace(0, 1, 64).view(1, 1, 1, 8, 8)
    got = q.encode(x)
    assert got.unique().tolist() == list(range(16))
    assert torch.all(got.flatten().diff() >= 0)
    assert (q.decode(got) - x).abs().max() <= 0.5 / 15 + 1e-6


def test_quantize_resizes_and_greys_rgb():
    q = QuantizeTokenizer(QuantizeConfig(image_size=16, channels=3, size=8, levels=16))
    x = torch.zeros(1, 1, 3, 16, 16)
    x[..., 1, :8, :] = 1.0  # pure green on the top half
    ids = q.encode(x)
    assert ids.shape == (1, 1, 8, 8)
    assert torch.all(ids[0, 0, :4] == round(0.587 * 15)) and torch.all(ids[0, 0, 4:] == 0)
    recon = q.decode(ids)
    assert recon.shape == (1, 1, 3, 16, 16)
    assert torch.allclose(recon[..., 0, :, :], recon[..., 1, :, :])


# -- mae block-causality -------------------------------------------------------------------------


def test_masks_follow_the_block_causal_rules():
    p, n = 3, 2
    enc = encoder_mask(2, p, n)  # tokens: f0 patches 0-2, f0 latents 3-4, f1 patches 5-7, f1 latents 8-9
    assert enc[0, :3].all() and not enc[0, 3:].any()          # patch: own-frame patches only
    assert enc[5, 5:8].all() and not enc[5, :5].any() and not enc[5, 8:].any()
    assert enc[3, :5].all() and not enc[3, 5:].any()          # frame-0 latent: nothing of frame 1
    assert enc[8].all()                                        # frame-1 latent: everything up to frame 1
    dec = decoder_mask(2, p, n)  # tokens: f0 latents 0-1, f0 queries 2-4, f1 latents 5-6, f1 queries 7-9
    assert dec[0, :2].all() and not dec[0, 2:].any()           # latent: latents only, causally
    assert dec[5, [0, 1, 5, 6]].all() and not dec[5, [2, 3, 4, 7, 8, 9]].any()
    assert dec[7, [0, 1, 5, 6, 7, 8, 9]].all() and not dec[7, [2, 3, 4]].any()


def test_mae_is_block_causal_over_time():
    torch.manual_seed(0)
    model = MAETokenizer(MAEConfig(**SMALL_MAE)).eval()
    x = blobs(2, 4)
    changed = x.clone()
    changed[:, 2:] = torch.rand_like(changed[:, 2:])  # frames 2 and 3 change
    with torch.no_grad():
        z, z2 = model.encode(x), model.encode(changed)
        # latents of frames 0..1 are untouched, those of frame 2 move
        assert torch.equal(z[:, :2], z2[:, :2])
        assert (z[:, 2] - z2[:, 2]).abs().max() > 1e-3
        # the decoder is block-causal too: frame t's pixels depend on latents <= t only
        y, y2 = model.decode(z), model.decode(z2)
        assert torch.equal(y[:, :2], y2[:, :2])
        assert (y[:, 2] - y2[:, 2]).abs().max() > 1e-3


def test_mae_patches_only_see_their_own_frame():
    """Latents of frame 1 change when frame 0 changes (latents look back) - the causal path exists."""
    torch.manual_seed(0)
    model = MAETokenizer(MAEConfig(**SMALL_MAE)).eval()
    x = blobs(1, 2)
    changed = x.clone()
    changed[:, 0] = 1 - changed[:, 0]
    with torch.no_grad():
        assert (model.encode(x)[:, 1] - model.encode(changed)[:, 1]).abs().max() > 1e-4


def test_mask_ratio_curriculum_and_masked_forward():
    assert mask_ratio_at(0, 0.8, 100) == 0.0
    assert mask_ratio_at(50, 0.8, 100) == pytest.approx(0.4)
    assert mask_ratio_at(500, 0.8, 100) == pytest.approx(0.8)
    assert mask_ratio_at(0, 0.8, 0) == pytest.approx(0.8)
    torch.manual_seed(0)
    model = MAETokenizer(MAEConfig(**SMALL_MAE)).eval()
    x = blobs(2, 2)
    with torch.no_grad():
        assert torch.equal(model(x, 0.0), model(x))       # no masking at ratio 0
        assert not torch.allclose(model(x, 0.9), model(x))  # masking changes the input


# -- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,config,steps,margin", [("cnn", SMALL_CNN, 100, 10.0), ("mae", SMALL_MAE, 200, 5.0)])
def test_overfits_one_small_batch(kind, config, steps, margin):
    """PSNR climbs well above that of the batch's mean image (what a collapsed tokenizer outputs)."""
    torch.manual_seed(0)
    model = build_tokenizer(kind, **config)
    x = blobs(4, 2)
    mean_psnr = psnr(to_images(x.mean(0, keepdim=True).expand_as(x)), to_images(x))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, parts = reconstruction_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = psnr(to_images(model(x)), to_images(x))
    assert parts["mse"] == pytest.approx(loss.item())
    assert end > mean_psnr + margin, (mean_psnr, end)


def test_reconstruction_loss_needs_a_perceptual_loss_for_lpips_weight():
    x = blobs(1, 1)
    with pytest.raises(ValueError, match="lpips_weight > 0 needs a perceptual loss"):
        reconstruction_loss(x, x, None, 0.2)
    loss, parts = reconstruction_loss(x * 0.5, x, lambda a, b: (a - b).abs().mean((1, 2, 3)), 0.5)
    assert loss.item() == pytest.approx(parts["mse"] + 0.5 * parts["lpips"])


def test_lpips_loss_where_lpips_can_be_built():
    try:
        distance = load_lpips("vgg")
    except LpipsUnavailable as exc:
        pytest.skip(f"LPIPS unavailable here: {exc}")
    x = blobs(2, 1, size=32)
    y = (x + 0.2 * torch.rand_like(x)).clamp(0, 1)
    loss, parts = reconstruction_loss(y, x, distance, 0.2)
    assert parts["lpips"] > 0 and loss.item() > parts["mse"]
    assert reconstruction_loss(x, x, distance, 0.2)[1]["lpips"] < 1e-4
