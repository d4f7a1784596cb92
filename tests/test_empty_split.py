"""A dataset with an empty train or test split is refused when it is loaded (an empty test split gave
test accuracy NaN, exit 0 and NaN in the JSON manifests)."""

import pytest
import torch
from safetensors.torch import save_file

from ddkit.cli import main
from ddkit.data import load_dataset, make_synthetic
from ddkit.errors import DataError


def _tensors(n_test: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"train_images": torch.randint(0, 256, (4, 1, 8, 8), generator=gen, dtype=torch.uint8),
            "train_labels": torch.tensor([0, 1, 0, 1]),
            "test_images": torch.randint(0, 256, (n_test, 1, 8, 8), generator=gen, dtype=torch.uint8),
            "test_labels": torch.zeros(n_test, dtype=torch.long)}


def test_empty_test_split_exits_2_and_writes_nothing(tmp_path, capsys):
    save_file(_tensors(0), tmp_path / "d.safetensors")
    out = tmp_path / "t"
    code = main(["teacher", "--dataset", "tensors", "--data-path", str(tmp_path / "d.safetensors"), "--model",
                 "tiny_convnet", "--epochs", "1", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "has an empty test split (0 images)" in err and "d.safetensors" in err
    assert not out.exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_source_refuses_an_empty_split(split):
    """The check is in DataBundle, which every dataset source returns."""
    kw = {"train_per_class": 0} if split == "train" else {"test_per_class": 0}
    with pytest.raises(DataError,
                       match=rf"dataset 'synthetic' .*has an empty {split} split \(0 images\); give it at least one"):
        make_synthetic(**kw)


def test_a_one_image_test_split_still_loads(tmp_path):
    save_file(_tensors(1), tmp_path / "d.safetensors")
    b = load_dataset("tensors", path=str(tmp_path / "d.safetensors"))
    assert (len(b.train), len(b.test)) == (4, 1)
