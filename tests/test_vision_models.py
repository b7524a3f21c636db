"""Vision models (chapters 12 and 16): logits equal transformers' ResNet, ViT and DeiT on tiny random checkpoints;
the book's CNN and ResNet-34 have the chapter's shapes; attention maps are the attention the model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchbook.hub import load_model, save_model
from torchbook.hub.vision import CONVERTERS, convert_convnext, convert_resnet, convert_vit, vit_key
from torchbook.models.cnn import FashionCNN, FashionCNNConfig, ResNet, ResNetConfig, resnet34
from torchbook.models.vit import ViT, ViTConfig, attention_rollout
from torchbook.nn.drop import drop_path

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_batch_norms(model: nn.Module) -> None:
    """Random running statistics and affine parameters, so the parity test covers them (fresh ones are 0/1)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)


@pytest.mark.parametrize("layer_type,bottleneck_stride", [("basic", False), ("bottleneck", False), ("bottleneck", True)])
def test_resnet_matches_transformers(layer_type, bottleneck_stride, tmp_path):
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetForImageClassification

    torch.manual_seed(0)
    hf_config = HFConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32], depths=[2, 1, 2],
                         layer_type=layer_type, downsample_in_bottleneck=bottleneck_stride, num_labels=5)
    hf = ResNetForImageClassification(hf_config).eval()
    with torch.no_grad():
        randomize_batch_norms(hf)
    ours = convert_resnet(hf.state_dict(), hf_config.to_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        assert torch.allclose(ours(x), expected, atol=1e-5)
        # saved and reloaded as a torchbook model: the same logits
        save_model(ours, tmp_path)
        assert torch.allclose(load_model(tmp_path)(x), expected, atol=1e-5)
    assert CONVERTERS[hf_config.model_type] is convert_resnet
    # a Hugging Face folder as transformers saves it, read by torchbook.load (dispatching on model_type)
    hf.save_pretrained(tmp_path / "hf")
    import torchbook

    with torch.no_grad():
        assert torch.allclose(torchbook.load(tmp_path / "hf").model(x), expected, atol=1e-5)


@pytest.mark.parametrize("layer_scale", [1e-6, 0.0])
def test_convnext_matches_transformers(layer_scale, tmp_path):
    from transformers import ConvNextConfig as HFConfig
    from transformers import ConvNextForImageClassification

    torch.manual_seed(0)
    hf_config = HFConfig(num_channels=3, patch_size=4, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3,
                         layer_scale_init_value=layer_scale, num_labels=4)
    hf = ConvNextForImageClassification(hf_config).eval()
    with torch.no_grad():  # random layer scales and norms (they start at 1e-6 and 1/0)
        for name, p in hf.named_parameters():
            if "layer_scale" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    ours = convert_convnext(hf.state_dict(), hf_config.to_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        assert torch.allclose(ours(x), expected, atol=1e-5)
        save_model(ours, tmp_path)
        assert torch.allclose(load_model(tmp_path)(x), expected, atol=1e-5)
    assert CONVERTERS["convnext"] is convert_convnext


def test_resnet_backbone_only_checkpoint_keeps_a_fresh_head():
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetModel

    hf_config = HFConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    hf = ResNetModel(hf_config).eval()
    ours = convert_resnet(hf.state_dict(), hf_config.to_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.features(x), hf(pixel_values=x).pooler_output.flatten(1), atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "deit", "deit-teacher"])
def test_vit_and_deit_match_transformers(family):
    import transformers

    torch.manual_seed(0)
    kwargs = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_labels=7)
    if family == "vit":
        hf_config = transformers.ViTConfig(**kwargs)
        hf = transformers.ViTForImageClassification(hf_config)
    else:
        hf_config = transformers.DeiTConfig(**kwargs)
        cls = (transformers.DeiTForImageClassificationWithTeacher if family == "deit-teacher"
               else transformers.DeiTForImageClassification)
        hf = cls(hf_config)
    hf.eval()
    hf.set_attn_implementation("eager")  # so that it returns its attention weights
    with torch.no_grad():  # random tokens and positions (HF initializes some at zero)
        for name, p in hf.named_parameters():
            if "token" in name or "position" in name:
                p.normal_()
    ours = convert_vit(hf.state_dict(), hf_config.to_dict())
    assert ours.config.distillation_token == (family != "vit")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=x, output_attentions=True)
        assert torch.allclose(ours(x), out.logits, atol=1e-5)
        # our attention maps are the weights transformers' eager attention computes
        maps = ours.attention_maps(x)
    assert maps.shape == (2, 3, 4, 16 + ours.config.n_tokens, 16 + ours.config.n_tokens)
    assert torch.allclose(maps, torch.stack(out.attentions), atol=1e-5)


def test_vit_keys_of_hub_files_map_like_transformers_5_names():
    """Hub checkpoints keep transformers 4's names (`encoder.layer.N.attention.attention.query`)."""
    pairs = {"vit.encoder.layer.3.attention.attention.query.weight": "vit.layers.3.attention.q_proj.weight",
             "vit.encoder.layer.0.attention.output.dense.bias": "vit.layers.0.attention.o_proj.bias",
             "deit.encoder.layer.1.intermediate.dense.weight": "deit.layers.1.mlp.fc1.weight",
             "vit.encoder.layer.1.output.dense.weight": "vit.layers.1.mlp.fc2.weight"}
    for old, new in pairs.items():
        assert vit_key(old) == vit_key(new) is not None
    assert vit_key("vit.pooler.dense.weight") is None


def test_fashion_cnn_has_the_chapters_layers():
    model = FashionCNN(FashionCNNConfig())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(64, 7), (128, 3), (128, 3), (256, 3), (256, 3)]
    dense = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert dense == [128, 64, 10]
    assert model.head[1].in_features == 256 * 3 * 3  # 28 -> 14 -> 7 -> 3 after three poolings
    assert model(torch.rand(4, 28, 28)).shape == (4, 10)


def test_resnet34_has_the_chapters_stages():
    model = resnet34(in_channels=1, n_classes=10)
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem conv + 2 per unit (16 units) = 33 weighted conv layers (+ 3 projections), + the dense layer = 34
    assert sum(c.kernel_size[0] > 1 for c in convs) == 33 and sum(c.kernel_size[0] == 1 for c in convs) == 3
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_stochastic_depth_keeps_the_expectation_and_is_off_in_eval():
    torch.manual_seed(0)
    x = torch.ones(20000, 3)
    y = drop_path(x, 0.3, training=True)
    dropped = (y == 0).all(1).float().mean()
    assert abs(float(dropped) - 0.3) < 0.02 and abs(float(y.mean()) - 1.0) < 0.03
    assert torch.equal(drop_path(x, 0.3, training=False), x)
    model = ResNet(ResNetConfig(in_channels=1, widths=[4, 8], depths=[2, 2], drop_path=0.5, n_classes=3,
                                pixel_mean=[0.0], pixel_std=[1.0])).eval()
    z = torch.rand(2, 1, 16, 16)
    assert torch.equal(model(z), model(z))


def test_attention_rollout_of_uniform_attention_is_uniform():
    maps = torch.full((3, 2, 4, 5, 5), 1 / 5)
    rollout = attention_rollout(maps, n_tokens=1)
    assert rollout.shape == (2, 4)
    assert torch.allclose(rollout, rollout[:, :1].expand_as(rollout))


def test_vit_from_scratch_shapes_and_reload(tmp_path):
    model = ViT(ViTConfig(image_size=28, patch_size=7, in_channels=1, n_classes=10, d_model=32, n_layers=2,
                          n_heads=4, d_ff=64, drop_path=0.1, pixel_mean=[0.5], pixel_std=[0.5])).eval()
    x = torch.rand(2, 28, 28)
    save_model(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), model(x))
