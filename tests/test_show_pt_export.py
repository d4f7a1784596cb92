"""`ddkit show` describes a `ddkit export --format pt` file (it said "record is corrupt (UnicodeDecodeError)")
and refuses other torch files with one line saying what it reads."""

import json

import torch

from ddkit.cli import main
from ddkit.describe import describe


def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_show_describes_a_pt_export(tmp_path, capsys):
    t, d, pt = (str(tmp_path / n) for n in ("t", "d", "set.pt"))
    assert main(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", t, "-q"]) == 0
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--teacher", t,
                 "--soft-labels", "--out", d, "-q"]) == 0
    assert main(["export", d, "--format", "pt", "--out", pt, "-q"]) == 0
    capsys.readouterr()
    code, out, err = _cli(["show", pt], capsys)
    assert code == 0, err
    assert out.startswith("pt-export: 4 classes, 2 images per class, from set ")
    assert ("images [8, 1, 16, 16] (float32, pixels in [0, 1]), labels [8], soft labels [8, 4]; "
            "classes class0, class1, class2, class3") in out
    assert describe(pt) == out.rstrip("\n")
    code, out, _ = _cli(["show", pt, "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["kind"] == "pt-export" and record["images"] == {"shape": [8, 1, 16, 16], "dtype": "float32"}
    assert _cli(["show", pt, "-q"], capsys)[:2] == (0, "")


def test_show_refuses_other_torch_files_in_one_line(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00\xffnot a torch file")
    for name, words in (("tensor.pt", "holds a Tensor, not a ddkit record"), ("garbage.pt", "is not a file `ddkit show` reads")):
        code, out, err = _cli(["show", str(tmp_path / name)], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert words in err and "a `ddkit export --format pt` file" in err
