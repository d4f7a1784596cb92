"""A constant image channel (std 0) is refused when its mean/std are computed, not trained into NaN."""

import pytest
import torch

from ddkit.cli import main
from ddkit.data import load_dataset
from ddkit.errors import DataError


def _tensors(train_images: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"train_images": train_images, "train_labels": torch.tensor([0, 1, 0, 1]),
            "test_images": torch.randint(0, 256, (2, *train_images.shape[1:]), generator=gen, dtype=torch.uint8),
            "test_labels": torch.tensor([0, 1])}


def test_all_zero_images_exit_2_and_write_nothing(tmp_path, capsys):
    torch.save(_tensors(torch.zeros(4, 1, 8, 8, dtype=torch.uint8)), tmp_path / "zero.pt")
    out = tmp_path / "t"
    code = main(["teacher", "--dataset", "tensors", "--data-path", str(tmp_path / "zero.pt"), "--model",
                 "tiny_convnet", "--epochs", "1", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "channel 0 of train_images in" in err and "is constant (std 0)" in err and "store mean and std" in err
    assert not out.exists()


def test_one_constant_channel_is_named_and_explicit_stats_are_taken(tmp_path):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    images[:, 1] = 0.3  # float rounding leaves a std of ~1e-17, not exactly 0
    t = _tensors(images)
    torch.save(t, tmp_path / "c.pt")
    with pytest.raises(DataError, match=r"^channel 1 of train_images in .*c\.pt is constant"):
        load_dataset("tensors", path=str(tmp_path / "c.pt"))
    torch.save({**t, "mean": torch.tensor([0.5, 0.3, 0.5]), "std": torch.tensor([0.3, 1.0, 0.3])}, tmp_path / "e.pt")
    assert load_dataset("tensors", path=str(tmp_path / "e.pt")).std == pytest.approx((0.3, 1.0, 0.3))
