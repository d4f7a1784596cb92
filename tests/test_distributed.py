"""torchrun with 2 gloo processes on CPU gives the single-process results.

Teacher training is data-parallel: the same global batches and augmentation draws, gradients
averaged over ranks, so weights agree up to float summation order (tolerance 1e-4 after a few
epochs). Evaluation spreads whole students over ranks, so its numbers are identical.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TOL = 1e-4


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddkit", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _single(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddkit", *args], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _teacher_weight_gap(settings: list[str], tmp_path) -> float:
    """Train a tiny teacher on generated data in one process (t1) and under 2-rank torchrun (t2);
    the largest weight difference."""
    args = ["teacher", "--dataset", "synthetic", "--model", "tiny_convnet", *settings, "-q"]
    _single([*args, "--out", "t1"], tmp_path)
    _torchrun([*args, "--out", "t2"], tmp_path)
    w1 = load_file(str(tmp_path / "t1/model.safetensors"))
    w2 = load_file(str(tmp_path / "t2/model.safetensors"))
    assert w1.keys() == w2.keys()
    return max(float((w1[k] - w2[k]).abs().max()) for k in w1)


def test_torchrun_teacher_and_evaluate_match_single_process(tmp_path):
    worst = _teacher_weight_gap(["--epochs", "3", "--set", "teacher.train.batch_size=32",
                                 "--set", "teacher.train.augment=dsa"], tmp_path)
    assert worst < TOL, f"max weight difference {worst}"
    m1 = json.loads((tmp_path / "t1/manifest.json").read_text())
    m2 = json.loads((tmp_path / "t2/manifest.json").read_text())
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 1 / 48 + 1e-9  # at most one test image flips
    assert m1["run"]["world_size"] == 1 and m2["run"]["world_size"] == 2

    _single(["distill", "--dataset", "synthetic", "--method", "random", "--ipc", "3", "--out", "d", "-q"], tmp_path)
    eval_args = ["evaluate", "d", "--seeds", "0,1,2", "--teacher", "t1", "--label-mode", "teacher",
                 "--set", "student=tiny_convnet", "--set", "train.epochs=8", "--set", "full_epochs=1",
                 "--set", "train.batch_size=16", "-q"]
    env_cache = {"DDKIT_CACHE": str(tmp_path / "c1")}
    os.environ.update(env_cache)
    try:
        _single([*eval_args, "--out", "e1.json"], tmp_path)
        os.environ["DDKIT_CACHE"] = str(tmp_path / "c2")
        _torchrun([*eval_args, "--out", "e2.json"], tmp_path)
    finally:
        os.environ.pop("DDKIT_CACHE", None)
    r1 = json.loads((tmp_path / "e1.json").read_text())["results"]
    r2 = json.loads((tmp_path / "e2.json").read_text())["results"]
    assert r1["distilled"] == r2["distilled"] and r1["random"] == r2["random"]
    assert abs(r1["full"]["mean"] - r2["full"]["mean"]) <= 2 / 48 + 1e-9
    assert json.loads((tmp_path / "e2.json").read_text())["timing"]["world_size"] == 2


def test_torchrun_trains_a_final_batch_smaller_than_the_world_as_one_process(tmp_path):
    """96 training images in batches of 19 leave a final batch of 1 image for 2 ranks: both train on it
    whole, so the weights still agree with one process's (skipping it moved them by a whole step)."""
    worst = _teacher_weight_gap(["--epochs", "2", "--set", "teacher.train.batch_size=19",
                                 "--set", "teacher.train.lr=0.1"], tmp_path)
    assert worst < TOL, f"max weight difference {worst}"


def test_shutdown_destroys_the_process_group(tmp_path):
    """ddist.shutdown waits for every rank and destroys the group (a no-op without one)."""
    import torch.distributed as dist

    from ddkit import distributed as ddist

    ddist.shutdown()  # nothing initialised: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.is_initialized() and ddist.current().world_size == 1
    ddist.shutdown()
    assert not dist.is_initialized()
    ddist.shutdown(barrier=False)
    assert not dist.is_initialized()


def _train_bn_rank(rank: int, store_path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.data.base import make_synthetic
    from ddkit.models import create_model
    from ddkit.training import TrainConfig, train_classifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        data = make_synthetic()
        c, h, _ = data.image_shape
        torch.manual_seed(0)
        model = create_model("convnet", c, data.num_classes, h, depth=1, width=4, norm="batchnorm")
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, ema_decay=0.9)
        result = train_classifier(model, data.train, data.mean, data.std, cfg, seed=0, distributed=True)
        torch.save({"model": [b.clone() for b in model.buffers()], "ema": [b.clone() for b in result.model.buffers()]},
                   f"{out}/rank{rank}.pt")
    finally:
        ddist.shutdown()
    # skip interpreter teardown: gloo's static destructors can abort a rank whose peer is still
    # closing its connection (see ddist.shutdown); the result is on disk and the exit code is what counts
    os._exit(0)


def test_ddp_ranks_end_with_the_same_batchnorm_statistics(tmp_path):
    """Each DDP rank updates BatchNorm running statistics from its own slice; after every epoch every
    rank holds rank 0's (model and EMA copy), so ranks evaluate and save the same network."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_train_bn_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "ema"):
        assert len(r0[part]) >= 3 and all(torch.equal(a, b) for a, b in zip(r0[part], r1[part])), part
    assert r0["model"][0].abs().sum() > 0  # running means moved from their zero start


def _loss_history(rank: int, world: int, store_path: str, out: str) -> None:
    """Train tiny_convnet (no BatchNorm) on generated data with ``world`` ranks; rank 0 saves the recorded losses."""
    import torch
    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.data.base import make_synthetic
    from ddkit.models import create_model
    from ddkit.training import TrainConfig, train_classifier

    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        data = make_synthetic()
        c, h, _ = data.image_shape
        torch.manual_seed(0)
        model = create_model("tiny_convnet", c, data.num_classes, h)
        # 96 images in batches of 19: the last batch holds 1 image, fewer than the ranks
        cfg = TrainConfig(epochs=2, batch_size=19, lr=0.05, augment="dsa")
        result = train_classifier(model, data.train, data.mean, data.std, cfg, seed=0, distributed=world > 1)
        if rank == 0:
            torch.save([r["loss"] for r in result.history], f"{out}/losses{world}.pt")
    finally:
        ddist.shutdown()
    if world > 1:
        os._exit(0)  # see _train_bn_rank


def test_ddp_history_loss_is_the_loss_over_every_rank(tmp_path):
    """The per-epoch training loss in the history covers every rank's images (all-reduced), and a final
    batch smaller than the world, trained whole on every rank, counts once: the single-process numbers."""
    import torch
    import torch.multiprocessing as mp

    _loss_history(0, 1, "", str(tmp_path))
    mp.spawn(_loss_history, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"losses{w}.pt", weights_only=True) for w in (1, 2))
    assert len(one) == len(two) == 2
    assert all(abs(a - b) < 1e-5 for a, b in zip(one, two)), (one, two)


def _run_rank(rank: int, store_path: str, out: str) -> None:
    """``pipeline.run`` on 2 gloo ranks; rank 1 loads the data 3 s late, as a rank held up on a busy machine."""
    import datetime
    import time

    import torch
    import torch.distributed as dist

    import ddkit.pipeline as pipeline
    from ddkit import distributed as ddist
    from ddkit.config import from_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 1:
            load = pipeline.load_dataset
            pipeline.load_dataset = lambda cfg: time.sleep(3) or load(cfg)
        cfg = from_dict(pipeline.RunConfig, {
            "dataset": {"name": "synthetic"}, "teacher": None, "distill": {"method": "random", "ipc": 2},
            "evaluate": {"label_modes": ["hard"], "seeds": [0, 1],
                         "overrides": {"student": "tiny_convnet", "full_epochs": 1, "train": {"epochs": 1}}},
            "device": "cpu", "out": f"{out}/run"})
        summary = pipeline.run(cfg)
        torch.save(summary["reused"], f"{out}/reused{rank}.pt")
    finally:
        ddist.shutdown()
    os._exit(0)  # see _train_bn_rank


def test_run_ranks_take_the_same_stages_when_one_rank_lags(tmp_path, monkeypatch):
    """A rank that reaches a stage after rank 0 has already written it (a method without collectives, such
    as random, writes its set at once) must not reuse that set while rank 0 made it: the two ranks would
    then call different collectives (rank 0 the barrier after the save, rank 1 the evaluation's gather)."""
    import torch
    import torch.multiprocessing as mp

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    mp.spawn(_run_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "reused0.pt") == torch.load(tmp_path / "reused1.pt") == []


def _run_fkd(rank: int, world: int, store_path: str, out: str) -> None:
    """``pipeline.run`` with label mode fkd and no store named (the run relabels its own set), on
    ``world`` gloo ranks (1: in this process)."""
    import torch
    import torch.distributed as dist

    import ddkit.pipeline as pipeline
    from ddkit import distributed as ddist
    from ddkit.config import from_dict

    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        cfg = from_dict(pipeline.RunConfig, {
            "dataset": {"name": "synthetic"}, "teacher": {"model": "tiny_convnet", "train": {"epochs": 1}},
            "distill": {"method": "random", "ipc": 2}, "relabel": {"epochs": 3, "top_k": 2},
            "evaluate": {"label_modes": ["fkd"], "seeds": [0], "overrides": {
                "student": "tiny_convnet", "random_baseline": False, "full_reference": False, "train": {"epochs": 3}}},
            "device": "cpu", "out": f"{out}/run{world}"})
        pipeline.run(cfg)
    finally:
        ddist.shutdown()
    if world > 1:
        os._exit(0)  # see _train_bn_rank


def test_run_relabels_its_set_under_torchrun_as_in_one_process(tmp_path, monkeypatch):
    """The run's labels stage is a collective (ranks label alternate epochs): 2 ranks store the labels of
    one process, to the byte, and the fkd students trained from them match."""
    import json

    import torch
    import torch.multiprocessing as mp

    monkeypatch.setenv("DDKIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the teachers must train alike
    try:
        _run_fkd(0, 1, "", str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_run_fkd, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    one, two = (tmp_path / f"run{w}" for w in (1, 2))
    assert (one / "labels/fkd_labels.safetensors").read_bytes() == (two / "labels/fkd_labels.safetensors").read_bytes()
    assert json.loads((one / "labels/manifest.json").read_text())["top_k"] == 2
    acc = [json.loads((d / "eval-fkd.json").read_text())["results"]["distilled"] for d in (one, two)]
    assert acc[0] == acc[1]


SLOW_RANK_PLUGIN = """
import os, time

from ddkit import distributed as ddist
from ddkit.methods.base import METHODS
from ddkit.methods.random import RandomSubset


@METHODS.register("slow_rank")
class SlowRank(RandomSubset):
    def fit(self, real, teachers, ctx):
        if ddist.current().rank == 1:
            time.sleep(12)  # a rank still working when the other reaches the barrier
        ddist.barrier()
        return super().fit(real, teachers, ctx)
"""


def test_a_rank_that_waits_past_the_timeout_names_the_setting(tmp_path):
    """torch's default collective timeout (30 min gloo, 10 min NCCL) ended a bench whose ranks waited
    while one trained a teacher or made a set, with "another process of this torchrun job stopped".
    ddkit waits $DDKIT_DIST_TIMEOUT minutes (24 h by default), and a wait past it names the setting."""
    (tmp_path / "slow_rank_plugin.py").write_text(SLOW_RANK_PLUGIN)
    env = {**_env(), "DDKIT_PLUGINS": "slow_rank_plugin", "DDKIT_DIST_TIMEOUT": "0.05", "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ddkit",
           "distill", "--dataset", "synthetic", "--method", "slow_rank", "--ipc", "2", "--out", "d", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "d").exists()
    line = next(li for li in proc.stderr.splitlines() if li.startswith("rank 0: error:"))
    assert line.startswith("rank 0: error: waited more than 0.05 min for another process of this torchrun job (")
    assert line.endswith("raise DDKIT_DIST_TIMEOUT (minutes) and rerun the command, which resumes where the job got to")


def test_dist_timeout_is_read_from_the_environment(monkeypatch):
    from ddkit import distributed as ddist
    from ddkit.errors import DDKitError

    monkeypatch.delenv("DDKIT_DIST_TIMEOUT", raising=False)
    assert ddist.timeout_minutes() == 24 * 60
    monkeypatch.setenv("DDKIT_DIST_TIMEOUT", "90")
    assert ddist.timeout_minutes() == 90
    monkeypatch.setenv("DDKIT_DIST_TIMEOUT", "43200")
    assert ddist.timeout_minutes() == 43200  # 30 days, the most
    for bad in ("0", "-5", "abc", "inf", "nan", "43201", "1e13"):
        monkeypatch.setenv("DDKIT_DIST_TIMEOUT", bad)
        with pytest.raises(DDKitError,
                           match=rf"^DDKIT_DIST_TIMEOUT='{bad}' is not a number of minutes in \(0, 43200\]; "
                                 "set it"):
            ddist.timeout_minutes()


def _agree_rank(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.data import make_synthetic
    from ddkit.errors import DDKitError
    from ddkit.evaluate import resolve_protocol
    from ddkit.evaluate.runner import full_reference

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        results = [ddist.agree_found(True, "x", "/c"), ddist.agree_found(False, "x", "/c")]
        try:
            ddist.agree_found(rank == 0, "the expert buffer e", "/c")  # rank 0 sees the entry, rank 1 does not
            results.append("agreed")
        except DDKitError as exc:
            results.append(str(exc))
        try:  # ranks that loaded different data look for different entries, whatever they found
            ddist.agree_found(rank == 0, f"the real-data statistics k{rank}", "/c")
            results.append("agreed")
        except DDKitError as exc:
            results.append(str(exc))
        # the full-data reference: filled by both ranks in a shared cache, then looked up with rank 1's
        # own empty cache (it trained in collectives that rank 0, returning from its cache, never joined)
        data = make_synthetic(num_classes=2, train_per_class=8, test_per_class=4, image_size=8)
        protocol = resolve_protocol("dc-protocol", {"student": "tiny_convnet", "full_epochs": 1,
                                                    "train": {"epochs": 1, "batch_size": 8}})
        shared = Path(out) / "cache-shared"
        results.append(full_reference(data, protocol, [0], "cpu", shared)["n"])
        try:
            full_reference(data, protocol, [0], "cpu", shared if rank == 0 else Path(out) / f"cache{rank}")
            results.append("agreed")
        except DDKitError as exc:
            results.append(str(exc).split(" (found")[0])
        with open(f"{out}/agree{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        ddist.shutdown()
    os._exit(0)


def test_ranks_that_see_different_caches_stop_with_the_fix(tmp_path):
    """Ranks decide from their own disk whether a cached artifact exists; ranks that disagree (nodes
    with their own $DDKIT_CACHE) would take different paths and hang in a collective: every rank
    stops with the fix instead."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    want = ("the ranks of this torchrun job disagree on whether the expert buffer e exists (found by ranks [0], not "
            "by ranks [1]); the nodes of a job must share the cache folder '/c': put it on storage every node mounts "
            "($DDKIT_CACHE, or the option that named it)")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"agree{rank}.json").read_text())
        other = ("the ranks of this torchrun job look for different cache entries (ranks [0]: the real-data "
                 "statistics k0; ranks [1]: the real-data statistics k1): they loaded different data or teachers; give "
                 "every rank the same --dataset and --data-path (the same files on every node), settings and teacher")
        assert got[:5] == [True, False, want, other, 1]
        assert re.fullmatch(r"the ranks of this torchrun job disagree on whether the full-data reference \w+\.json "
                            r"exists", got[5]), got[5]


def _import_rank(rank: int, store_path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ddkit.data import make_synthetic
    from ddkit.models import create_model
    from ddkit.teacher import TeacherConfig, train_teacher

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        data = make_synthetic(num_classes=2, train_per_class=4, test_per_class=2, image_size=8)
        ckpt = f"{out}/weights.pt"
        if rank == 0:
            torch.manual_seed(0)
            torch.save(create_model("tiny_convnet", 1, 2, 8).state_dict(), ckpt)
        dist.barrier()
        teacher = train_teacher(data, TeacherConfig(model="tiny_convnet", checkpoint=ckpt), f"{out}/t")
        # every rank returns once the artifact is there, and knows where it is
        with open(f"{out}/import{rank}.json", "w") as f:
            json.dump([str(teacher.path), os.path.isfile(f"{out}/t/manifest.json")], f)
    finally:
        from ddkit import distributed as ddist

        ddist.shutdown()
    os._exit(0)


def test_an_imported_teacher_is_saved_before_any_rank_goes_on(tmp_path):
    """Importing a checkpoint under torchrun: rank 0 saved the artifact, but no rank waited for it (the
    others could read the folder before it existed) and they returned a teacher without its path."""
    import torch.multiprocessing as mp

    mp.spawn(_import_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"import{rank}.json").read_text()) == [str(tmp_path / "t"), True]


def _refused_rank(rank: int, store_path: str, out: str) -> None:
    """``distill`` (random) on 2 gloo ranks, with rank 0's ``DistilledSet.build`` refusing the set."""
    import torch.distributed as dist

    import ddkit.pipeline as pipeline
    from ddkit import distributed as ddist
    from ddkit.data.base import DatasetConfig, load_dataset
    from ddkit.errors import DDKitError

    def refuse(*args, **kw):
        raise DDKitError("the set holds NaN pixels; fix the method")

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        if rank == 0:
            pipeline.DistilledSet.build = refuse
        try:
            pipeline.distill(load_dataset(DatasetConfig(name="synthetic")),
                             pipeline.DistillConfig(method="random", ipc=2), None, f"{out}/d")
            result = "made"
        except DDKitError as exc:
            result = str(exc)
        with open(f"{out}/refused{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        ddist.shutdown()
    os._exit(0)  # see _train_bn_rank


def test_a_set_rank_0_refuses_stops_every_rank_with_its_error(tmp_path):
    """Under torchrun rank 0 alone builds the set (the other ranks read it back once saved): its refusal
    stops every rank with rank 0's error, where the others would wait for a set that is never saved."""
    import torch.multiprocessing as mp

    mp.spawn(_refused_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"refused{rank}.json").read_text()) == "the set holds NaN pixels; fix the method"
    assert not (tmp_path / "d").exists()


class _Stop(Exception):
    pass


def _teacher_cfg():
    from ddkit.teacher import TeacherConfig

    return TeacherConfig(model="convnet1-w4-bn", train={"epochs": 3, "batch_size": 8})


def _teacher_world_rank(rank: int, store_path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.data import make_synthetic
    from ddkit.teacher import train_teacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        data = make_synthetic(num_classes=2, train_per_class=8, test_per_class=2, image_size=8)
        train_teacher(data, _teacher_cfg(), f"{out}/t")  # beside the 1-process run's checkpoint
        train_teacher(data, _teacher_cfg(), f"{out}/fresh")
    finally:
        ddist.shutdown()
    os._exit(0)  # see _train_bn_rank


def test_a_teacher_checkpoint_of_another_world_size_is_not_resumed(tmp_path):
    """A BatchNorm teacher trains differently on 2 ranks: a 1-process run's epoch checkpoint resumed by a
    2-rank run gave weights that neither run gives. The 2-rank run starts afresh (as a recover method's
    synthesis does), discards the other checkpoint and gives the uninterrupted 2-rank weights."""
    import torch
    import torch.multiprocessing as mp

    from ddkit.data import make_synthetic
    from ddkit.teacher import train_teacher

    def stop(epoch, total, record):
        if epoch == 1:
            raise _Stop

    data = make_synthetic(num_classes=2, train_per_class=8, test_per_class=2, image_size=8)
    with pytest.raises(_Stop):
        train_teacher(data, _teacher_cfg(), tmp_path / "t", progress=stop)
    assert len(list(tmp_path.glob(".t.resume-*.pt"))) == 1
    mp.spawn(_teacher_world_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    resumed, fresh = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("t", "fresh"))
    assert resumed.keys() == fresh.keys()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    assert list(tmp_path.glob(".t.resume-*")) == []
    assert json.loads((tmp_path / "t/manifest.json").read_text())["run"]["world_size"] == 2


def _disagree_rank(rank: int, store_path: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from ddkit import distributed as ddist
    from ddkit.data.base import DatasetConfig, load_dataset
    from ddkit.errors import DDKitError
    from ddkit.evaluate import evaluate
    from ddkit.labels import relabel
    from ddkit.pipeline import DistillConfig, distill
    from ddkit.teacher import TeacherConfig, train_teacher

    # ranks that went on with their own settings could wait for each other: a short timeout fails them
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = load_dataset(DatasetConfig(name="synthetic", train_per_class=8, test_per_class=2))
        with ddist.single_process():  # the same inputs on both ranks, made apart
            teacher = train_teacher(data, {"model": "tiny_convnet", "train": {"epochs": 1}}, f"{out}/t{rank}")
            made = distill(data, DistillConfig(method="random", ipc=2), out=f"{out}/set{rank}")
        results = [ddist.agree_settings({"a": {"x": 1, "y": [2, 3]}, "b": None})]
        calls = {  # each stage with one setting given to rank 1 alone
            "settings": lambda: ddist.agree_settings({"a": {"x": 1, "y": rank}, "b": {"c": rank}}),
            "distill": lambda: distill(data, DistillConfig(method="random", ipc=2, seed=rank), out=f"{out}/d"),
            "teacher": lambda: train_teacher(data, TeacherConfig(model="tiny_convnet", seed=rank), f"{out}/t"),
            "relabel": lambda: relabel(made, teacher, 2, top_k=1 + rank, out=f"{out}/f"),
            "evaluate": lambda: evaluate(made, {"student": "tiny_convnet", "train": {"epochs": 1 + rank}}, [0],
                                         data=data, out=f"{out}/e.json"),
        }
        for call in calls.values():
            try:
                call()
                results.append("ran")
            except DDKitError as exc:
                results.append(str(exc))
        with open(f"{out}/disagree{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        ddist.shutdown()
    os._exit(0)  # see _train_bn_rank


def test_ranks_started_with_different_settings_stop_naming_them(tmp_path):
    """Ranks given different settings (another seed, option or epoch count on one rank) each made their share
    of the work with their own, and rank 0 recorded only its own: a set half of one seed and half of another,
    a report whose students trained for different epochs. Every stage now stops every rank first, in one line
    naming the settings, and writes nothing."""
    import torch.multiprocessing as mp

    mp.spawn(_disagree_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    said = ("the ranks of this torchrun job were started with different settings (they differ in {}); give every "
            "rank the same command, data and teacher")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"disagree{rank}.json").read_text())
        assert got == [None, said.format("a.y, b.c"), said.format("distill.seed"), said.format("teacher.seed"),
                       said.format("relabel.top_k"), said.format("protocol.train.epochs")]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("store", "disagree"))) == [
        "set0", "set1", "t0", "t1"]
