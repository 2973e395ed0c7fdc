import pytest

from jaccli.errors import ModelLoadError
from jaccli.io.models import ModelFormat, sniff_model_format

EXPECTED = {
    "self-describing safetensors": ModelFormat.SAFETENSORS,
    "plain safetensors + spec": ModelFormat.SAFETENSORS,
    "state_dict + spec": ModelFormat.TORCH_PICKLE,
    "checkpoint + import string": ModelFormat.TORCH_PICKLE,
    "torchscript": ModelFormat.TORCHSCRIPT,
    "torch.export": ModelFormat.EXPORT,
    "pickled module (trusted)": ModelFormat.TORCH_PICKLE,
}


def test_every_format_is_recognized_by_content(model_files, tmp_path):
    for name, entry in model_files.items():
        # A misleading suffix must not matter.
        renamed = tmp_path / f"renamed_{name.replace(' ', '_')}.bin"
        renamed.write_bytes(entry["path"].read_bytes())
        assert sniff_model_format(renamed) is EXPECTED[name], name


def test_unknown_and_corrupt_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a model")
    with pytest.raises(ModelLoadError, match="not a model format jaccli reads"):
        sniff_model_format(text)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        sniff_model_format(truncated)
    with pytest.raises(ModelLoadError, match="not found"):
        sniff_model_format(tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="is a directory"):
        sniff_model_format(tmp_path)
