"""ddkit as a library in a caller's long-lived process (a notebook, a training script): what the caller's objects,
callbacks, umask and repeated calls meet (QA review 15a)."""

import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ddkit
from ddkit.artifacts import save_tensors, write_json
from ddkit.config import from_dict
from ddkit.data import save_tensors as save_data
from ddkit.distilled import DistilledSet
from ddkit.errors import ConfigError, DDKitError
from ddkit.evaluate import ProtocolConfig, evaluate
from ddkit.labels import relabel
from ddkit.methods.base import SyntheticSet
from ddkit.pipeline import DistillConfig, RunConfig, distill, run
from ddkit.training import TrainConfig


@pytest.fixture(scope="module")
def data():
    """The generated data as ``load_dataset`` gives it (a config to record, unlike ``tiny``)."""
    return ddkit.load_dataset("synthetic")


def _float_set(data, normalize=False):
    images = torch.linspace(-0.5, 1.5, 8 * 16 * 16).view(8, 1, 16, 16)
    ds = DistilledSet.build(SyntheticSet(images, torch.arange(4).repeat_interleave(2)), data, method="dm",
                            method_config={}, ipc=2, seed=0, config={}, dataset_config={"name": "synthetic"})
    ds.normalize = normalize
    return ds


def _one_epoch(**kw) -> ProtocolConfig:
    return ProtocolConfig(student="tiny_convnet", full_reference=False, random_baseline=False,
                          train=TrainConfig(epochs=1, batch_size=8), **kw)


def test_a_sample_of_a_float_set_is_the_callers_own(data, tmp_path):
    """ds[i] of a float32 set was a view of the set's images: the caller's in-place transform (x.mul_()) rewrote
    the set, which later stages used and recorded as the original. Now a copy, with the same values."""
    ds = _float_set(data)
    before = ds.images.clone()
    x, y = ds[3]
    assert torch.equal(x, before[3]) and x.dtype == torch.float32 and y == 1  # the numbers are unchanged
    x.clamp_(0, 1).mul_(0.5)
    assert torch.equal(ds.images, before)
    ds.save(tmp_path / "set")
    loaded = ddkit.load(tmp_path / "set")
    loaded[0][0].zero_()
    assert torch.equal(loaded.images, before)
    norm = _float_set(data, normalize=True)
    mean, std = torch.tensor(norm.mean).view(-1, 1, 1), torch.tensor(norm.std).view(-1, 1, 1)
    assert torch.equal(norm[5][0], (before[5] - mean) / std)
    quantised = distill(data, DistillConfig(method="random", ipc=2))  # uint8 pixels: a new tensor as before
    assert torch.equal(quantised[2][0], quantised.images[2].float() / 255.0)


def test_a_soft_label_store_pickles_after_a_replay(data):
    """evaluate's replay memoised a lambda normaliser in the store: pickle (a spawn DataLoader worker, joblib)
    failed with "Can't pickle local object" afterwards. The memo is left out and made again."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 4))
    ds = distill(data, DistillConfig(method="random", ipc=2))
    store = relabel(ds, teacher, 1)
    replay = store.replay(0, torch.arange(4))
    views = store.render(replay, ds.images.float() / 255.0, data.mean, data.std)
    assert store._norms  # render's memo, filled
    again = pickle.loads(pickle.dumps(store))
    assert again._norms == {} and store._norms  # the caller's store keeps its memo
    assert torch.equal(again.render(again.replay(0, torch.arange(4)), ds.images.float() / 255.0, data.mean,
                                    data.std), views)


def test_distill_and_run_take_a_dict_config(data, tmp_path):
    """distill(data, {...}) and run({...}) raised AttributeError ('dict' object has no attribute 'method'), where
    evaluate takes a dict protocol: a dict is checked as YAML is, anything else is one line naming the type."""
    assert torch.equal(distill(data, {"method": "random", "ipc": 2}).images,
                       distill(data, DistillConfig(method="random", ipc=2)).images)
    with pytest.raises(ConfigError, match=r"^unknown config key 'distill.ipcs'; did you mean 'ipc'\?$"):
        distill(data, {"method": "random", "ipcs": 2})
    with pytest.raises(ConfigError, match=r"^cfg must be a DistillConfig or a dict of its settings, got str 'random'$"):
        distill(data, "random")
    with pytest.raises(ConfigError, match=r"^cfg must be a RunConfig or a dict of its settings, got list \[\]$"):
        run([])
    with pytest.raises(ConfigError, match=r"^cfg must be a TeacherConfig or a dict of its settings, got int 3$"):
        ddkit.train_teacher(data, 3)
    settings = {"dataset": {"name": "synthetic"}, "teacher": None, "distill": {"method": "random", "ipc": 2},
                "out": str(tmp_path / "run"),
                "evaluate": {"label_modes": ["hard"], "seeds": [0],
                             "overrides": {"student": "tiny_convnet", "full_reference": False,
                                           "random_baseline": False, "train": {"epochs": 1}}}}
    summary = run(settings)
    assert summary["evaluations"] == run(from_dict(RunConfig, settings))["evaluations"]
    assert summary["reused"] == []


def test_old_form_progress_of_evaluate_and_run_is_called_as_before(data, tmp_path, monkeypatch):
    """An old-form progress(stage, epoch, total) was called with (epoch, total, record) by evaluate and run, silently;
    run_bench had a shim for it. Now all three recognise it, call it the old way and say it goes. (Each call has a
    cache of its own: a student read from the cache reports no epochs.)"""
    ds = distill(data, DistillConfig(method="random", ipc=2))
    seen, new = [], []

    def old(stage, epoch, total):
        seen.append((stage, epoch, total))

    with pytest.warns(DeprecationWarning, match=r"^evaluate\(progress=\) now calls progress\(step, total, ") as w:
        report = evaluate(ds, _one_epoch(), [0], data=data, progress=old, cache_dir=tmp_path / "c1")
    assert [x.filename for x in w] == [__file__]  # the caller's line, past evaluate's decorators
    import ddkit

    seen.clear()  # ddkit.evaluate, the callable module the README shows, adds a frame of its own
    with pytest.warns(DeprecationWarning, match=r"^evaluate\(progress=\) now calls progress") as w:
        assert ddkit.evaluate(ds, _one_epoch(), [0], data=data, progress=old,
                              cache_dir=tmp_path / "c2")["results"] == report["results"]
    assert [x.filename for x in w] == [__file__] and seen[-1] == ("distilled, seed 0", 1, 1)
    assert seen == [("distilled, seed 0", 0, 1), ("distilled, seed 0", 1, 1)]
    plain = evaluate(ds, _one_epoch(), [0], data=data, progress=lambda step, total, record: new.append(record["stage"]),
                     cache_dir=tmp_path / "c3")
    assert plain["results"] == report["results"] and new == ["distilled, seed 0"] * 2
    seen.clear()
    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "c4"))
    cfg = from_dict(RunConfig, {"dataset": {"name": "synthetic"}, "teacher": None, "out": str(tmp_path / "run"),
                                "distill": {"method": "random", "ipc": 2},
                                "evaluate": {"label_modes": ["hard"], "seeds": [0],
                                             "overrides": {"student": "tiny_convnet", "full_reference": False,
                                                           "random_baseline": False, "train": {"epochs": 1}}}})
    with pytest.warns(DeprecationWarning, match=r"^run\(eval_progress=\) now calls eval_progress\(step, total, ") as w:
        run(cfg, eval_progress=old)
    assert [x.filename for x in w] == [__file__]
    assert seen == [("distilled, seed 0", 0, 1), ("distilled, seed 0", 1, 1)]


def test_stages_results_print_as_one_line_of_facts(data, bn_teacher, tmp_path):
    """Teacher, DistilledSet and SoftLabelStore printed as <... object at 0x...>; a DataBundle's repr dumped its
    pixels (4,443 characters for the 144-image synthetic set)."""
    ds = distill(data, DistillConfig(method="random", ipc=2, soft_labels=True), teacher=bn_teacher,
                 out=tmp_path / "set")
    assert repr(ds) == (f"DistilledSet(method='random', dataset='synthetic', classes=4, ipc=2, "
                        f"images=uint8[8, 1, 16, 16], soft_labels=float32[8, 4], bytes={8 * 256 + 8 * 8 + 8 * 16}, "
                        f"path={str(tmp_path / 'set')!r})")
    assert str(ds) == repr(ds)
    accuracy = round(bn_teacher.test_accuracy, 4)
    assert repr(bn_teacher) == (f"Teacher(model='convnet', dataset='synthetic', classes=4, test_accuracy={accuracy}, "
                                f"weights_sha={bn_teacher.fingerprint!r})")
    own = ddkit.teacher.Teacher.of_module(nn.Sequential(nn.Flatten(), nn.Linear(256, 4)), data)  # a caller's module
    assert repr(own) == f"Teacher(model='Sequential', dataset='synthetic', classes=4, weights_sha={own.fingerprint!r})"
    store = relabel(ds, bn_teacher, 1, augment="none")
    assert repr(store) == (f"SoftLabelStore(epochs=1, images=8, classes=4, augment='none', "
                           f"teacher={bn_teacher.fingerprint!r}, bytes={store.nbytes})")
    assert repr(data) == ("DataBundle(name='synthetic', classes=4, train=ImageSet(images=uint8[96, 1, 16, 16], "
                          "labels=int64[96]), test=ImageSet(images=uint8[48, 1, 16, 16], labels=int64[48]), "
                          "source='generated(seed=0)')")


def test_stored_mode_says_it_leaves_extra_teachers_out_for_every_set_and_protocol(data, bn_teacher, tmp_path,
                                                                                  monkeypatch, caplog):
    """The warning was said once per process: a second evaluation (another set, another protocol, a later notebook
    cell) dropped the protocol's extra_teachers silently. It is said once per set and protocol: not again for the
    same pair (another seed), so a loop over seeds says it once."""
    import ddkit.evaluate.runner as runner

    monkeypatch.setattr(runner, "_STORED_EXTRAS_SAID", set())
    sets = [distill(data, DistillConfig(method="random", ipc=2, seed=s, soft_labels=True), teacher=bn_teacher)
            for s in (0, 1)]
    protocols = [_one_epoch(label_mode="stored", loss=loss, extra_teachers=[str(tmp_path / "t2")])
                 for loss in ("kl", "mse_ce")]
    said = []
    for ds, protocol, seed in [(sets[0], protocols[0], 0), (sets[0], protocols[0], 1), (sets[1], protocols[0], 0),
                               (sets[0], protocols[1], 0), (sets[1], protocols[0], 1)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="ddkit.evaluate.runner"):
            evaluate(ds, protocol, [seed], data=data, teacher=bn_teacher)
        said.append(sum("does not use the protocol's extra_teachers" in r.message for r in caplog.records))
    assert said == [1, 0, 1, 1, 0]


def test_atomic_writes_make_missing_folders_and_name_the_callers_path(data, tmp_path, monkeypatch):
    """save_tensors / save_grid into a missing folder raised FileNotFoundError naming ddkit's hidden temporary
    ('.x.safetensors.tmp-<host>-<pid>-<hex>'); they make the folders, as distilled-set and teacher outputs do, and a
    temporary that cannot be made is one line naming the caller's path."""
    cfg = save_data(data, tmp_path / "a/b/data.safetensors")
    assert cfg.path == str(tmp_path / "a/b/data.safetensors")
    assert ddkit.load_dataset(cfg).fingerprint == data.fingerprint
    ds = distill(data, DistillConfig(method="random", ipc=2))
    assert ds.save_grid(tmp_path / "c/d/grid.png") == tmp_path / "c/d/grid.png"
    assert (tmp_path / "c/d/grid.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(DDKitError, match=rf"^output '{tmp_path}/file/x.png' lies inside '{tmp_path}/file', which is a "
                                         "file; give another path$"):
        ds.save_grid(tmp_path / "file/x.png")
    real_open = os.open

    def refused(path, *args, **kwargs):  # a folder that may not be written in (root may write anywhere)
        if ".tmp-" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(DDKitError) as info:
        save_tensors(tmp_path / "e/x.safetensors", {"a": torch.zeros(2)})
    assert str(info.value) == (f"cannot write {str(tmp_path / 'e/x.safetensors')!r}: Permission denied; check the "
                               "path and its permissions, or choose another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "e", "file"] and not any((tmp_path / "e").iterdir())


def test_files_take_the_umask_of_their_write(data, tmp_path):
    """The file mode was computed from the umask at import: after the caller's os.umask(0o077) ddkit's files were
    0644 (beside its own 0600 ones), after os.umask(0o022) they were 0600. They take the umask of the write."""
    ds = distill(data, DistillConfig(method="random", ipc=2))
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    before = os.umask(0o077)
    try:
        for mask in (0o077, 0o022, 0o027):
            os.umask(mask)
            out = tmp_path / f"{mask:o}"
            write_json(out / "r.json", {})
            save_tensors(out / "t.safetensors", {"a": torch.zeros(2)})
            ds.save_grid(out / "g.png")
            ds.save(out / "set")
            files = [out / "r.json", out / "t.safetensors", out / "g.png", *(out / "set").iterdir()]
            assert {p.name: mode(p) for p in files} == {p.name: 0o666 & ~mask for p in files}, oct(mask)
    finally:
        os.umask(before)


ONE_RANK_CALL = """
import datetime, time
import torch.distributed as dist
import ddkit
from ddkit.distributed import single_process

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # the caller's own job, not ddkit's
if dist.get_rank() == 0:
    data = ddkit.load_dataset("synthetic")
    with single_process():  # README: a call on one rank of the caller's job
        ds = ddkit.distill(data, ddkit.DistillConfig(method="random", ipc=2))
    print("set", ds.images.sum().item(), ds.labels.tolist(), flush=True)
else:
    time.sleep(1)  # this rank never calls ddkit
dist.barrier()  # the caller's own collective afterwards pairs with the other rank's, not with one of ddkit's
dist.destroy_process_group()
"""


def test_a_call_on_one_rank_of_the_callers_own_job_runs_single_process(data, tmp_path):
    """In the caller's own torch.distributed job, a stage called on rank 0 only waited in ddkit's collectives for a
    rank that never joined (until the group's timeout). README documents single_process() for it: the call runs on
    that rank alone and gives the single-process set."""
    (tmp_path / "job.py").write_text(ONE_RANK_CALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(ddkit.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "job.py"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = distill(data, DistillConfig(method="random", ipc=2))
    assert proc.stdout.splitlines() == [f"set {alone.images.sum().item()} {alone.labels.tolist()}"]


@pytest.mark.parametrize("stage", ["distill", "train_teacher", "relabel", "run", "run_bench", "run nested"])
def test_an_out_in_a_folder_that_cannot_be_written_is_one_line_before_any_work(data, bn_teacher, tmp_path,
                                                                               monkeypatch, stage):
    """ddkit.distill, relabel, run and run_bench with an ``out`` in a read-only folder raised a raw PermissionError
    (OSError) at their first write, train_teacher (and relabel) after a first epoch of work; the CLI said it in one
    line. Now each refuses as a WriteFailure (a DDKitError) naming the output and the fix before any work, and
    leaves nothing in the folder. (As root, whom modes do not stop, the folder fails as a read-only mount does.)"""
    from ddkit.artifacts import WriteFailure
    from ddkit.bench import BenchConfig, run_bench
    from test_data_cache import read_only

    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "sub" / "out" if stage == "run nested" else ro / "out"
    ds = _float_set(data)
    read_only(monkeypatch, ro)
    steps = []

    def progress(*args):
        steps.append(args)

    one_epoch = {"student": "tiny_convnet", "full_reference": False, "random_baseline": False, "train": {"epochs": 1}}
    calls = {
        "distill": lambda: distill(data, {"method": "random", "ipc": 2}, out=out, progress=progress),
        "train_teacher": lambda: ddkit.train_teacher(data, {"model": "tiny_convnet", "train": {"epochs": 1}}, out,
                                                     progress=progress),
        "relabel": lambda: relabel(ds, bn_teacher, 1, out=out, progress=progress),
        "run": lambda: run({"dataset": {"name": "synthetic"}, "distill": {"method": "random", "ipc": 2},
                            "out": str(out), "evaluate": {"seeds": [0], "overrides": one_epoch}},
                           progress_factory=lambda name: progress, eval_progress=progress),
        "run_bench": lambda: run_bench(from_dict(BenchConfig, {
            "datasets": ["synthetic"], "methods": ["random"], "ipcs": [2], "students": ["tiny_convnet"],
            "label_modes": ["hard"], "seeds": [0], "overrides": {k: v for k, v in one_epoch.items() if k != "student"},
            "out": str(out)}), stage_progress=progress),
    }
    with pytest.raises(WriteFailure) as info:
        calls[stage.split()[0]]()
    where = f" in {str(ro)!r}" if stage == "run nested" else ""  # the folder above the missing ones it would make
    assert re.fullmatch(rf"cannot write {re.escape(repr(str(out)))}: (Permission denied{where}; check the path and its "
                        rf"permissions, or|Read-only file system{where};) choose another --out", str(info.value)), \
        str(info.value)
    assert steps == [] and os.listdir(ro) == []


def test_a_second_thread_writing_the_same_out_is_told_so(data, tmp_path):
    """The writing lock (flock, per open folder) also refuses a second call from another thread of the same process,
    but its message said "another ddkit process is writing": the caller looked for a process that was not there. The
    message now names a call in this process or another, in one line."""
    import threading

    from ddkit.artifacts import OutputBusy

    out = tmp_path / "set"
    inside, release, failed = threading.Event(), threading.Event(), []

    def first(step, total, record):  # the first call, in another thread, is distilling into out
        inside.set()
        release.wait(60)

    def distil_in_thread():
        try:
            distill(data, {"method": "dm", "ipc": 2, "options": {"iterations": 2}}, out=out, progress=first)
        except BaseException as exc:  # reported below
            failed.append(exc)

    thread = threading.Thread(target=distil_in_thread)
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(OutputBusy) as info:
            distill(data, {"method": "random", "ipc": 2}, out=out)
    finally:
        release.set()
        thread.join()
    assert str(info.value) == (f"another ddkit call (in this process or another) is writing {str(out)!r}; wait for it "
                               "or choose another --out")
    assert failed == [] and ddkit.load(out).method == "dm"  # the first call finished, unharmed


def test_stages_ignore_the_callers_default_device(data, bn_teacher, tmp_path, monkeypatch):
    """A caller's torch.set_default_device("meta") (or "cuda", with ddkit on the CPU) put the tensors and models ddkit
    makes without a device there: load_dataset, train_teacher, distill, evaluate, relabel and saving or loading a set
    failed deep inside torch. Every stage and artifact call now makes them on the CPU, as with no default device set,
    to the same numbers, and leaves the caller's setting as it was."""

    def stages(where):
        monkeypatch.setenv("DDKIT_CACHE", str(where / "cache"))  # computed, not read back from the first call
        teacher = ddkit.train_teacher(ddkit.load_dataset("synthetic"), {"model": "tiny_convnet",
                                                                        "train": {"epochs": 1}})
        sets = {m: distill(data, {"method": m, "ipc": 2, "options": o}, out=where / m, teacher=bn_teacher)
                for m, o in (("random", {}), ("dm", {"iterations": 2}), ("sre2l", {"iterations": 2}))}
        report = evaluate(sets["dm"], _one_epoch(label_mode="teacher"), [0], data=data, teacher=bn_teacher)
        store = relabel(ddkit.load(where / "random"), bn_teacher, 1)
        store.save(where / "store")
        loaded = ddkit.load(where / "dm", normalize=True)
        return ([*teacher.model.state_dict().values()], [s.images for s in sets.values()],
                report["results"]["distilled"]["per_seed"], store.targets(0, list(range(8))),
                ddkit.load(where / "store").targets(0, list(range(8))), loaded[3][0])

    plain = stages(tmp_path / "plain")
    torch.set_default_device("meta")
    try:
        meta = stages(tmp_path / "meta")
        assert torch.get_default_device() == torch.device("meta")  # the caller's setting, as it was
    finally:
        torch.set_default_device(None)
    for mine, theirs in zip(meta, plain, strict=True):
        if isinstance(mine, list) and mine and isinstance(mine[0], float):
            assert mine == theirs
            continue
        for a, b in zip(mine if isinstance(mine, list) else [mine], theirs if isinstance(theirs, list) else [theirs],
                        strict=True):
            assert a.device == torch.device("cpu") and torch.equal(a, b)
