"""`ddkit show` describes a `ddkit export --format pt` file (it said "record is corrupt (UnicodeDecodeError)")
and refuses other torch files with one line saying what it reads."""

import json

import pytest
import torch

from conftest import run_cli
from ddkit.cli import main
from ddkit.describe import describe


def test_show_describes_a_pt_export(tmp_path, capsys, caplog):
    t, d, pt = (str(tmp_path / n) for n in ("t", "d", "set.pt"))
    assert (main(["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", "--epochs", "1", "--out", t, "-q"])
            == 0)
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--teacher", t,
                 "--soft-labels", "--out", d, "-q"]) == 0
    assert main(["export", d, "--format", "pt", "--out", pt, "-q"]) == 0
    capsys.readouterr()
    code, out, err = run_cli(["show", pt], capsys)
    assert code == 0, err
    assert out.startswith("pt-export: 4 classes, 2 images per class, from set ")
    assert ("images [8, 1, 16, 16] (float32, pixels in [0, 1]), labels [8], soft labels [8, 4]; "
            "classes class0, class1, class2, class3") in out
    assert describe(pt) == out.rstrip("\n")
    code, out, _ = run_cli(["show", pt, "--json"], capsys)
    record = json.loads(out)
    assert (code == 0 and record["kind"] == "pt-export"
            and record["images"] == {"shape": [8, 1, 16, 16], "dtype": "float32"})
    assert run_cli(["show", pt, "-q"], capsys)[:2] == (0, "")

    # a truncated export: named as damaged, with the fix; evaluate of any file says a set is a folder
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "set.pt").read_bytes()[:300])
    code, out, err = run_cli(["show", str(cut)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is damaged or not a file `ddkit show` reads" in err
    assert "remove it and export the set again" in err
    code, out, err = run_cli(["evaluate", str(cut), "--protocol", "dc-protocol", "-q"], capsys)
    assert (code, err) == (2, f"error: {str(cut)!r} is a file, not a distilled-set artifact (a folder holding "
                              "manifest.json); pass the artifact's folder\n")
    # never over a file it cannot read
    code, _, err = run_cli(["export", d, "--format", "pt", "--out", str(cut), "-q"], capsys)
    assert code == 2 and "exists and is not a readable ddkit pt export; choose another --out or remove it" in err
    cut.unlink()  # the advice, followed
    assert (main(["export", d, "--format", "pt", "--out", str(cut), "-q"]) == 0
            and run_cli(["show", str(cut)], capsys)[0] == 0)

    # exporting over an earlier pt export replaces it, and says so as a folder export does
    caplog.clear()
    assert main(["export", d, "--format", "pt", "--out", pt]) == 0
    assert f"replaced the earlier pt-export {pt}" in caplog.text


def test_show_refuses_other_torch_files_in_one_line(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00\xffnot a torch file")
    for name, words in (("tensor.pt", "holds a Tensor, not a ddkit record"),
                        ("garbage.pt", "is damaged or not a file `ddkit show` reads")):
        code, out, err = run_cli(["show", str(tmp_path / name)], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert words in err and "a `ddkit export --format pt` file" in err


def test_exports_and_reports_of_an_older_ddkit_are_named_so_and_replaced(tmp_path, capsys, caplog):
    """Early ddkit wrote a pt export as the set's fields without a kind, an imagefolder export's classes.json
    without one and a report folder without a manifest: `show` called them "not a ddkit record (kind None)" and
    `export --format pt` refused to replace the old file."""
    d = str(tmp_path / "d")
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", d, "-q"]) == 0
    old_pt = tmp_path / "old.pt"
    torch.save({"images": torch.zeros(8, 1, 16, 16), "labels": torch.arange(4).repeat_interleave(2),
                "classes": ["class0", "class1", "class2", "class3"], "mean": [0.5], "std": [0.25]}, old_pt)
    old_png = tmp_path / "old.png"
    (old_png / "000_class0").mkdir(parents=True)
    (old_png / "000_class0" / "00000.png").write_bytes(b"png")
    (old_png / "classes.json").write_text(json.dumps({"classes": ["class0"], "folders": ["000_class0"]}))
    report = tmp_path / "report"
    report.mkdir()
    for name in ("report.md", "report.html"):
        (report / name).write_text("x")
    capsys.readouterr()

    for target, fmt in ((old_pt, "pt"), (old_png, "imagefolder"), (old_png / "classes.json", "imagefolder")):
        code, out, err = run_cli(["show", str(target)], capsys)
        folder = old_png if fmt == "imagefolder" else old_pt
        assert (code, out) == (2, "") and err == (
            f"error: {str(folder)!r} was written by an older ddkit export (it records no kind); export it again: "
            f"`ddkit export SET --format {fmt} --out {str(folder)!r}`\n")
    code, out, err = run_cli(["show", str(report)], capsys)
    assert (code, out) == (2, "") and err == (
        f"error: {str(report)!r} is a `ddkit report` folder written by an older ddkit (no manifest.json); run "
        f"`ddkit report BENCH_FOLDER --out {str(report)!r}` again\n")

    # the fix each names: exporting over them replaces them, with the warning a current export's replacement gives
    caplog.clear()
    assert main(["export", d, "--format", "pt", "--out", str(old_pt)]) == 0
    assert f"replaced the earlier pt-export {old_pt}" in caplog.text
    assert run_cli(["show", str(old_pt)], capsys)[0] == 0
    caplog.clear()
    assert main(["export", d, "--format", "imagefolder", "--out", str(old_png)]) == 0
    assert f"replaced the earlier output in {old_png}" in caplog.text
    assert run_cli(["show", str(old_png)], capsys)[0] == 0
    other = tmp_path / "other.pt"  # a dict of other fields is still no export of ours: never replaced
    torch.save({"images": torch.zeros(1)}, other)
    code, _, err = run_cli(["export", d, "--format", "pt", "--out", str(other), "-q"], capsys)
    assert code == 2 and "exists and is not a readable ddkit pt export" in err


@pytest.mark.parametrize("extra", ["notes.txt", "my_other_data/f", "000_class0/notes.txt", "000_class0/sub/x.png"])
def test_a_hand_made_folder_with_an_old_style_classes_json_is_not_replaced(tmp_path, capsys, extra):
    """A folder whose classes.json had classes and folders but no kind passed for an older ddkit's imagefolder
    export, and an export over it replaced it with everything else in it. Only classes.json and the listed
    class folders of images make one."""
    d = str(tmp_path / "d")
    assert main(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "2", "--out", d, "-q"]) == 0
    mine = tmp_path / "mydata"
    (mine / "000_a").mkdir(parents=True)
    (mine / "000_a" / "00000.png").write_bytes(b"png")
    (mine / "classes.json").write_text(json.dumps({"classes": ["a"], "folders": ["000_a"]}))
    (mine / extra.replace("000_class0", "000_a")).parent.mkdir(parents=True, exist_ok=True)
    (mine / extra.replace("000_class0", "000_a")).write_text("precious")
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
    capsys.readouterr()
    code, out, err = run_cli(["export", d, "--format", "imagefolder", "--out", str(mine), "-q"], capsys)
    assert (code, out) == (2, "") and err == (
        f"error: output {str(mine)!r} exists and is not a ddkit output (no manifest); choose another --out or "
        "remove it\n")
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
    assert (mine / extra.replace("000_class0", "000_a")).read_text() == "precious"
