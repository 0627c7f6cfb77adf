"""UNet: shapes, input checks, DP-compatibility with Opacus."""

import pytest
import torch
from torch import nn

from napari_feddp.models import UNet
from napari_feddp.models.unet import Upsample2x


@pytest.mark.parametrize(
    ("depth", "base_width", "groups", "activation", "upsampling"),
    [
        (1, 8, 4, "relu", "bilinear"),
        (2, 8, 4, "silu", "transposed"),
        (3, 8, 8, "relu", "transposed"),
        (4, 16, 8, "silu", "bilinear"),
    ],
)
def test_forward_returns_logits_with_input_size(depth, base_width, groups, activation, upsampling):
    model = UNet(
        n_classes=3, depth=depth, base_width=base_width, groups=groups,
        activation=activation, upsampling=upsampling,
    )
    logits = model(torch.rand(2, 3, 16, 24))
    assert logits.shape == (2, 3, 16, 24)
    assert logits.dtype == torch.float32


def test_dropout_layers_are_present_and_inactive_in_eval():
    model = UNet(depth=2, base_width=8, groups=4, dropout=0.5).eval()
    assert any(isinstance(module, nn.Dropout2d) for module in model.modules())
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(model(x), model(x))


def test_size_not_multiple_of_downsampling_is_rejected_with_hint():
    model = UNet(depth=4, base_width=8, groups=4)
    with pytest.raises(ValueError, match=r"multiples of 8, received 30x32.*32x32"):
        model(torch.rand(1, 3, 30, 32))


def test_wrong_channel_count_is_rejected():
    model = UNet(depth=2, base_width=8, groups=4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), received \(1, 4, 16, 16\)"):
        model(torch.rand(1, 4, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_width": 12, "groups": 8}, "base_width: expected a multiple of groups=8"),
        ({"depth": 0}, "depth: expected a positive integer"),
        ({"dropout": 1.0}, r"dropout: expected a number in \[0, 1\)"),
        ({"activation": "gelu"}, "activation: expected one of"),
        ({"upsampling": "nearest"}, "upsampling: expected one of"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


@pytest.mark.parametrize("upsampling", ["bilinear", "transposed"])
def test_no_batchnorm_and_no_layers_opacus_cannot_sample(upsampling):
    model = UNet(upsampling=upsampling)
    forbidden = (nn.modules.batchnorm._BatchNorm, nn.ConvTranspose2d, nn.InstanceNorm2d)
    assert not [m for m in model.modules() if isinstance(m, forbidden)]
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_default_model_is_small():
    n_bytes = sum(p.numel() * p.element_size() for p in UNet().parameters())
    assert n_bytes < 10 * 2**20


def test_config_rebuilds_an_identical_architecture():
    model = UNet(n_classes=4, depth=3, base_width=8, groups=2, upsampling="transposed")
    rebuilt = UNet(**model.config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_transposed_upsampling_equals_conv_transpose_2x2():
    # The docstring's claim: 1x1 conv + PixelShuffle == ConvTranspose2d(k=2, s=2).
    torch.manual_seed(0)
    in_channels, out_channels = 3, 2
    reference = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
    upsample = Upsample2x(in_channels, out_channels, "transposed")
    with torch.no_grad():
        weight = reference.weight  # (in, out, 2, 2) -> (out * 4, in, 1, 1)
        upsample.project.weight.copy_(weight.permute(1, 2, 3, 0).reshape(-1, in_channels, 1, 1))
        upsample.project.bias.copy_(reference.bias.repeat_interleave(4))
    x = torch.rand(1, in_channels, 5, 4)
    torch.testing.assert_close(upsample(x), reference(x))


@pytest.mark.parametrize("upsampling", ["bilinear", "transposed"])
def test_opacus_validator_finds_no_errors(upsampling):
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(UNet(upsampling=upsampling), strict=False) == []


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("upsampling", ["bilinear", "transposed"])
def test_one_dp_sgd_step_with_opacus_hooks(upsampling):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = UNet(depth=2, base_width=8, groups=4, upsampling=upsampling)
    images = torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 2, (2, 32, 32))
    loader = DataLoader(TensorDataset(images, masks), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="hooks",
        poisson_sampling=False,  # a fixed batch of 2 keeps the test deterministic in size
    )
    batch_images, batch_masks = next(iter(private_loader))
    private_optimizer.zero_grad()
    loss = nn.functional.cross_entropy(private_model(batch_images), batch_masks)
    loss.backward()

    for parameter in model.parameters():
        assert parameter.grad_sample is not None
        assert parameter.grad_sample.shape == (2, *parameter.shape)
    private_optimizer.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
