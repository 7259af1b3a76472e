"""torchvision -> zoo conversion: logits parity for every convertible model, backbone stage
parity (resnet50, vgg16_bn, googlenet), file round trips, and the strict errors (missing /
unexpected / mis-shaped keys, pickles that need code).

torchvision's pretrained weights cannot be downloaded here: every test builds torchvision models
with random weights (BatchNorm statistics and biases random too), as the released files would
be converted. One torch import serves the whole file.
"""

from __future__ import annotations

import gc
import json
import marshal

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zoo import cards, cli, convert, parity, weights  # noqa: E402
from zoo.checkpoints import load_model  # noqa: E402
from zoo.registry import create_model, model_info  # noqa: E402

tv = parity.import_torchvision()
torch.set_num_threads(2)

MODELS = convert.convertible_models()


def test_every_torchvision_model_is_convertible():
    assert set(MODELS) == {
        "alexnet", "googlenet", "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101",
        "resnet152", "wide_resnet50_2", "resnext50_32x4d",
        *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))}


@pytest.mark.parametrize("name", MODELS)
def test_logits_parity(name):
    """zoo logits == torchvision logits (float32, eval) at the smallest input the model takes
    (VGGs at batch 1: their 25088x4096 FC makes each ~0.5 GB)."""
    result = parity.logits_parity(name, batch=1 if name.startswith("vgg") else 2)
    gc.collect()
    jax.clear_caches()
    assert result["input"][1] == model_info(name).min_size
    assert result["logit_scale"] > 1e-3  # a real signal, not all-zero logits
    assert result["relative"] < 1e-4, result


@pytest.mark.parametrize("name,size", [("alexnet", 224), ("vgg11", 224)])
def test_flatten_order_at_full_size(name, size):
    """At the smallest input the map before the first FC is 1x1, repeated by the adaptive pool:
    every position holds the same values, so a permutation that mixed up h and w would pass.
    At 224 the 6x6 / 7x7 map is real."""
    result = parity.logits_parity(name, size=size, batch=1)
    gc.collect()
    jax.clear_caches()
    assert result["relative"] < 1e-4, result


@pytest.mark.parametrize("name,size", [("resnet50", 64), ("vgg16_bn", 32), ("googlenet", 64)])
def test_backbone_stage_parity(name, size):
    """Each stage map of the backbone built from converted weights is the output of the
    torchvision module `feature_info` names (forward hooks), at an input where every stage map
    is at least 2x2."""
    from zoo.features import backbone_variables

    x = np.random.default_rng(0).standard_normal((2, size, size, 3), np.float32)
    tv_model = parity.torchvision_model(name, calibration_input=x)
    stages = model_info(name).feature_info
    ref = {}
    hooks = [tv_model.get_submodule(s.torch_module).register_forward_hook(
        lambda m, i, out, key=s.torch_module: ref.setdefault(key, out.detach().clone()))
        for s in stages]
    with torch.no_grad():
        tv_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    for h in hooks:
        h.remove()
    converted, kwargs, _ = convert.convert_state_dict(name, tv_model.state_dict())
    del tv_model
    variables = backbone_variables(name, converted, **kwargs)
    backbone = create_model(name, features_only=True, **kwargs)
    maps = jax.jit(lambda v, a: backbone.apply(v, a, train=False))(variables, x)
    relative = {}
    for s, m in zip(stages, maps):
        want = ref[s.torch_module].numpy().transpose(0, 2, 3, 1)
        assert m.shape == want.shape, s
        relative[s.name] = float(np.abs(np.asarray(m) - want).max() / np.abs(want).max())
    del converted, variables
    gc.collect()
    jax.clear_caches()
    assert max(relative.values()) < 1e-4, relative


@pytest.mark.parametrize("name", ["vgg19_bn"])  # every VGG has logits parity above
def test_vgg_keys_and_shapes(name):
    """torchvision's keys and shapes (meta tensors, no weights) are exactly what the zoo model
    needs, and the inverse map gives them back."""
    with torch.device("meta"):
        model = tv.models.get_model(name, weights=None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    variables, kwargs, dropped = convert.convert_state_dict(name, zeros)
    assert kwargs == {"num_classes": 1000}
    assert all(k.endswith("num_batches_tracked") for k in dropped)
    back = convert.torchvision_state_dict(name, variables)
    assert {k: v.shape for k, v in back.items()} == shapes
    del variables, back
    gc.collect()


# ---------------------------------------------------------------- files and round trips


@pytest.fixture(scope="module")
def resnet18():
    """A random torchvision resnet18 (10 classes), its numpy state_dict and a test input."""
    model = parity.torchvision_model("resnet18", num_classes=10)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return model, convert.state_dict_to_numpy(model.state_dict()), x, ref


def _logits(name, variables, x, **kwargs):
    model = create_model(name, **kwargs)
    return np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))


def test_pth_safetensors_checkpoint_round_trip(resnet18, tmp_path):
    from safetensors.numpy import save_file

    model, sd, x, ref = resnet18
    torch.save(model.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp_path / "w.safetensors")
    from_pth = convert.load_torchvision("resnet18", tmp_path / "resnet18-f37072fd.pth")
    from_st = convert.load_torchvision("resnet18", tmp_path / "w.safetensors")
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_st)
    logits = _logits("resnet18", from_pth, x, num_classes=10)
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()

    # python -m zoo convert -> Orbax checkpoint + card -> load_model: the same logits
    out = tmp_path / "ckpt"
    assert cli.convert(["resnet18", "--from", str(tmp_path / "resnet18-f37072fd.pth"),
                        "--out", str(out)]) == 0
    loaded, variables, info, card = load_model(out)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda v, a: loaded.apply(v, a, train=False))(variables, x)), logits)
    assert card["model"] == "resnet18" and card["create_kwargs"] == {"num_classes": 10}
    assert card["source"]["sha256"] == weights.file_sha256(tmp_path / "resnet18-f37072fd.pth")
    # recognised by its file name; the random file's hash is not the release's, and it says so
    assert card["source"]["torchvision_weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert card["source"]["sha256_matches_release"] is False
    assert card["preprocessing"]["resize_size"] == 256 and card["preprocessing"]["crop_size"] == 224
    assert card["preprocessing"]["mean"] == list(info.mean)
    assert card["reference_top1"] == 69.758
    json.dumps(card)

    # and back: the inverse map gives torchvision's state_dict exactly
    back = convert.torchvision_state_dict("resnet18", from_pth)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_googlenet_transform_input_aux_and_drop_aux(tmp_path):
    """googlenet: transform_input recorded, aux heads (with the 4x4x128 flatten permutation)
    round trip, and dropping them is explicit."""
    model = parity.torchvision_model("googlenet", calibrate=False)
    sd = convert.state_dict_to_numpy(model.state_dict())
    variables, kwargs, dropped = convert.convert_state_dict("googlenet", sd)
    assert kwargs == {"num_classes": 1000, "transform_input": True}
    assert "aux1" in variables["params"]
    back = convert.torchvision_state_dict("googlenet", variables)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # the aux fc1 permutation: an NHWC-flattened map through the zoo kernel == torch's NCHW
    feat = np.random.default_rng(0).standard_normal((1, 128, 4, 4)).astype(np.float32)
    torch_out = feat.reshape(1, -1) @ sd["aux1.fc1.weight"].T
    zoo_out = feat.transpose(0, 2, 3, 1).reshape(1, -1) @ variables["params"]["aux1"]["fc1"]["kernel"]
    np.testing.assert_allclose(zoo_out, torch_out, rtol=1e-5, atol=1e-4)

    _, kwargs, dropped = convert.convert_state_dict("googlenet", sd, drop_aux=True)
    assert kwargs["aux_logits"] is False and any(k.startswith("aux1.") for k in dropped)
    no_aux = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
    with pytest.raises(convert.ConversionError, match="drop_aux") as e:
        convert.convert_state_dict("googlenet", no_aux)
    assert "aux1.fc1.weight" in e.value.missing
    variables, kwargs, _ = convert.convert_state_dict("googlenet", no_aux, drop_aux=True)
    assert "aux1" not in variables["params"] and kwargs["aux_logits"] is False


# ---------------------------------------------------------------- strict errors


def _error(name, sd, **kw) -> convert.ConversionError:
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_state_dict(name, sd, **kw)
    return e.value


def test_missing_key(resnet18, tmp_path):
    sd = dict(resnet18[1])
    del sd["layer2.1.bn2.running_var"]
    err = _error("resnet18", sd)
    assert err.missing == ["layer2.1.bn2.running_var"] and not err.unexpected
    assert "1 missing key: layer2.1.bn2.running_var" in str(err)
    # through a file, too
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp_path / "m.pth")
    with pytest.raises(convert.ConversionError, match="missing key: layer2.1.bn2.running_var"):
        convert.load_torchvision("resnet18", tmp_path / "m.pth")


def test_unexpected_key(resnet18):
    sd = {**resnet18[1], "layer4.2.conv1.weight": np.zeros((512, 512, 3, 3), np.float32)}
    err = _error("resnet18", sd)
    assert err.unexpected == ["layer4.2.conv1.weight"] and not err.missing
    assert "1 unexpected key: layer4.2.conv1.weight" in str(err)


def test_transposed_tensor(resnet18):
    sd = dict(resnet18[1])
    sd["conv1.weight"] = sd["conv1.weight"].transpose(2, 3, 1, 0)  # already HWIO: a double convert
    err = _error("resnet18", sd)
    assert len(err.mismatched) == 1 and "conv1.weight is (7, 7, 3, 64)" in err.mismatched[0]
    assert "(64, 3, 7, 7)" in str(err) and "mis-shaped" in str(err)


def test_other_model_lists_everything(resnet18):
    err = _error("resnet34", resnet18[1])
    assert "layer1.2.conv1.weight" in err.missing and "missing" in str(err)


class _RunsCode:
    """Unpickling this runs code: `marshal.loads` rebuilds a code object, which `exec` would run."""

    def __reduce__(self):
        code = compile("open(__import__('os').environ['ZOO_PWNED'], 'w').write('ran')", "x", "exec")
        return (marshal.loads, (marshal.dumps(code),))


class _Exec:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['ZOO_PWNED'], 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_RunsCode, _Exec])
def test_pickle_with_code_is_refused_not_run(resnet18, tmp_path, monkeypatch, payload):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("ZOO_PWNED", str(marker))
    path = tmp_path / "evil.pth"
    sd = {k: torch.from_numpy(np.array(v)) for k, v in list(resnet18[1].items())[:3]}
    torch.save({**sd, "extra": payload()}, path)
    with pytest.raises(convert.ConversionError, match="refused: its pickle needs code") as e:
        convert.load_torchvision("resnet18", path)
    assert "not run" in str(e.value) and "weights_only" in str(e.value)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(convert.ConversionError, match="not a readable torch file"):
        convert.load_torchvision("resnet18", tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(convert.ConversionError, match="not a readable safetensors file"):
        convert.load_torchvision("resnet18", tmp_path / "junk.safetensors")
    with pytest.raises(convert.ConversionError, match="does not exist"):
        convert.load_torchvision("resnet18", tmp_path / "absent.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(convert.ConversionError, match="unknown weight format"):
        convert.load_torchvision("resnet18", tmp_path / "w.npz")


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"nope")
    assert cli.convert(["resnet18", "--from", str(tmp_path / "junk.pth"),
                        "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_timm_logits_parity(name):
    """timm's ResNets share torchvision's state_dict layout: its random weights convert through
    the same strict map and give the same logits."""
    pytest.importorskip("timm")
    result = parity.logits_parity(name, source="timm")
    gc.collect()
    assert result["logit_scale"] > 1e-3 and result["relative"] < 1e-4, result


def test_timm_card_records_timms_preprocessing(resnet18, tmp_path):
    pytest.importorskip("timm")
    _, sd, _, _ = resnet18
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
               tmp_path / "resnet18_a1.pth")
    out = tmp_path / "ckpt"
    assert cli.convert(["resnet18", "--from", str(tmp_path / "resnet18_a1.pth"), "--out",
                        str(out), "--timm", "resnet18.a1_in1k"]) == 0
    card = load_model(out)[3]
    # timm's config for resnet18.a1_in1k: 224 crop at crop_pct 0.95, bicubic
    assert card["preprocessing"]["interpolation"] == "bicubic"
    assert card["preprocessing"]["crop_size"] == 224
    assert card["preprocessing"]["resize_size"] == round(224 / 0.95)
    assert card["source"]["timm_weights"] == "resnet18.a1_in1k"
    info = cards.apply_preprocessing(model_info("resnet18"), card["preprocessing"])
    assert (info.interpolation, info.resize_size) == ("bicubic", 236)
    with pytest.raises(ValueError, match="not of resnet18's architecture"):
        cards.timm_preprocessing("resnet18", "resnet50.a1_in1k")
    with pytest.raises(ValueError, match="has no timm twin"):
        cards.timm_preprocessing("vgg16", "vgg16.tv_in1k")
