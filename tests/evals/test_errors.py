"""Bad inputs are one-line OperaErrors, raised before any work (and before --output is made)."""

import pytest

from opera.errors import OperaError
from opera.evals.diagnose import DiagnoseConfig, run_diagnose
from opera.evals.finetune import finetune_config, run_finetune
from opera.evals.knn import KNNConfig, run_knn
from opera.evals.linear import LinearConfig, run_linear
from opera.evals.transfer import TransferConfig, run_transfer


def _raises(match, fn, *a, **kw):
    with pytest.raises(OperaError, match=match) as exc:
        fn(*a, **kw)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_checkpoint(tmp_path):
    msg = _raises("does not exist", run_linear, LinearConfig(checkpoint=str(tmp_path / "nope"), output=str(tmp_path / "o")))
    assert "random:<backbone>" in msg
    _raises("does not exist", run_knn, KNNConfig(checkpoint=str(tmp_path / "nope.safetensors"), output=str(tmp_path / "o")))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    _raises("neither backbone.safetensors nor last.pt", run_knn, KNNConfig(checkpoint=str(empty), output=str(tmp_path / "o")))
    _raises("no --checkpoint", run_knn, KNNConfig(checkpoint="", output=str(tmp_path / "o")))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "backbone.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    _raises("cannot read", run_knn, KNNConfig(checkpoint=str(bad), output=str(tmp_path / "o")))
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    _raises("cannot load checkpoint", run_knn, KNNConfig(checkpoint=str(bad), output=str(tmp_path / "o")))


def test_checkpoint_of_another_backbone(trained_run, tmp_path):
    for ck in (trained_run, trained_run / "last.pt", trained_run / "backbone.safetensors"):
        msg = _raises("holds a 'resnet_tiny' backbone, not 'resnet50'", run_linear,
                      LinearConfig(checkpoint=str(ck), backbone="resnet50", output=str(tmp_path / "o")))
        assert "--backbone resnet_tiny" in msg
    _raises("builds a 'resnet_tiny' backbone but --backbone is 'resnet50'", run_knn,
            KNNConfig(checkpoint="random:resnet_tiny", backbone="resnet50", output=str(tmp_path / "o")))
    _raises("unknown backbone 'resnet_tinyy'", run_knn, KNNConfig(checkpoint="random:resnet_tinyy", output=str(tmp_path / "o")))


def test_data_spec_with_classes_out_of_range(tmp_path):
    out = tmp_path / "o"
    for fn, cfg in ((run_linear, LinearConfig(checkpoint="random:resnet_tiny", data="digits:8-12", output=str(out))),
                    (run_knn, KNNConfig(checkpoint="random:resnet_tiny", data="digits:8-12", output=str(out))),
                    (run_diagnose, DiagnoseConfig(checkpoint="random:resnet_tiny", data="digits:8-12", output=str(out)))):
        _raises("outside digits's 10 classes", fn, cfg)
    _raises("outside digits's 10 classes", finetune_config, checkpoint="random:resnet_tiny", data="digits:8-12", output=str(out))
    _raises("outside digits's 10 classes", run_finetune,
            finetune_config("digits", checkpoint="random:resnet_tiny", data="digits:8-12", output=str(out)))
    assert not out.exists()
    _raises("unknown dataset", run_knn, KNNConfig(checkpoint="random:resnet_tiny", data="imagenet", output=str(out)))
    _raises("--target", run_transfer, TransferConfig(checkpoint="random:resnet_tiny", target=f"{tmp_path}", output=str(out)))


def test_transfer_classification_needs_local_datasets(tmp_path):
    out = str(tmp_path / "o")
    _raises("needs --root", run_transfer, TransferConfig(checkpoint="random:resnet_tiny", suite="classification", output=out))
    msg = _raises("cifar10 not found under", run_transfer,
                  TransferConfig(checkpoint="random:resnet_tiny", suite="classification", root=str(tmp_path), output=out))
    assert "cifar-10-batches-py" in msg and "never downloads" in msg
    _raises("did you mean pets", run_transfer,
            TransferConfig(checkpoint="random:resnet_tiny", suite="classification", root=str(tmp_path), datasets="pet", output=out))
    msg = _raises("config key suite must be one of classification, digits, segmentation, detection, got 'digit'",
                  run_transfer, TransferConfig(checkpoint="random:resnet_tiny", suite="digit", output=out))
    assert "--set suite=" in msg
    _raises("unknown --protocols entry 'linaer'", run_transfer,
            TransferConfig(checkpoint="random:resnet_tiny", protocols="linaer", output=out))


def test_bad_options(tmp_path):
    out = str(tmp_path / "o")
    _raises("unknown fine-tuning recipe 'finetune_100'", finetune_config, "finetune_100", checkpoint="random:resnet_tiny", output=out)
    _raises(r"config key epochs=0 is out of range: must be >= 1; set --set epochs=", run_linear,
            LinearConfig(checkpoint="random:resnet_tiny", epochs=0, output=out))
    _raises("config key amp must be one of auto, bf16, off, got 'fp8'", finetune_config, checkpoint="random:resnet_tiny",
            amp="fp8", output=out)
    from opera.backbones import create_backbone
    from opera.engine.checkpoint import export_backbone

    vit = export_backbone(create_backbone("vit_tiny", img_size=32), tmp_path / "vit" / "backbone.safetensors")
    _raises("--img-size 64 differs from the 32px", run_knn, KNNConfig(checkpoint=str(vit), img_size=64, output=out))
    _raises("no --output", run_knn, KNNConfig(checkpoint="random:resnet_tiny", output=""))
    f = tmp_path / "file"
    f.write_text("")
    _raises("is a file", run_knn, KNNConfig(checkpoint="random:resnet_tiny", output=str(f)))
