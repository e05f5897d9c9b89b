"""Every registered model (image and text): output shapes, declared feature widths, finite gradients."""
import pytest
import torch

from pruning_lab.errors import UserError
from pruning_lab.models import MODELS, create_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_chans,size,classes", [(3, 32, 10), (1, 28, 7)])
def test_registered_model_contract(name, in_chans, size, classes):
    torch.manual_seed(0)
    model = create_model(name, classes, in_chans, size)
    # Image models take [B, C, H, W]; text models their own input (token ids, size = sequence length).
    x = model.example_input(2, "cpu") if hasattr(model, "example_input") else torch.randn(2, in_chans, size, size)
    logits, features = model(x)
    assert logits.shape == (2, classes)
    assert len(features) == len(model.feature_widths) > 0
    for f, width in zip(features, model.feature_widths):
        # CNN features are [B, C, H, W], transformer tokens [B, N, D], MLP activations [B, D].
        channel_dim = 1 if f.ndim in (2, 4) else -1
        assert f.shape[0] == 2 and f.shape[channel_dim] == width
    (logits.square().mean() + sum(f.mean() for f in features)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.arch == {"name": name, "num_classes": classes, "in_chans": in_chans, "image_size": size, "kwargs": {}}


def test_lab_architectures():
    r18, r8 = create_model("resnet18"), create_model("resnet8")
    assert r18.stem[0].kernel_size == (3, 3) and r18.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in r18.modules())
    assert [len(s) for s in r18.stages] == [2, 2, 2, 2] and [len(s) for s in r8.stages] == [1, 1, 1, 1]
    assert 11.1e6 < sum(p.numel() for p in r18.parameters()) < 11.2e6
    vt, vs = create_model("vit_tiny"), create_model("vit_student")
    assert (len(vt.vit.blocks), vt.vit.embed_dim, vt.vit.blocks[0].attn.num_heads) == (12, 192, 3)
    assert (len(vs.vit.blocks), vs.vit.embed_dim, vs.vit.patch_embed.patch_size) == (6, 192, (4, 4))
    mlp = create_model("mnist_mlp", 10, 1, 28)
    assert [(l.in_features, l.out_features) for l in (mlp.fc1, mlp.fc2, mlp.fc3)] == [(784, 784), (784, 256), (256, 10)]


def test_small_widths_for_tests():
    model = create_model("resnet18", width=8)
    assert model.feature_widths == [8, 16, 32, 64]
    assert model.arch["kwargs"] == {"width": 8}


def test_unknown_model_and_bad_args():
    with pytest.raises(UserError, match="unknown model 'resnet99'; registered models: .*resnet18"):
        create_model("resnet99")
    with pytest.raises(UserError, match="bad model_args for 'resnet8'"):
        create_model("resnet8", depth=3)
