"""torchrun DDP on CPU (Gloo): two processes train one run; rank 0 alone writes the run directory."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _engine_fixtures import make_image_folder
from freezetune.device.distributed import DistInfo, init_from_env, wrap
from freezetune.inference.evaluation import evaluate_checkpoint
from freezetune.run import checkpoint
from freezetune.run.reporting import read_metrics, unfreeze_events


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env()
    assert not info.enabled and info.is_main
    model = torch.nn.Linear(2, 2)
    assert wrap(model, info, torch.device("cpu")) is model


@pytest.mark.multiprocess
def test_torchrun_two_processes_train_with_unfreeze(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "freezetune", "train", "--model", "timm:test_efficientnet", "--weights", "none", "--data", str(data),
        "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--workers", "0",
        "--no-progress", "--freeze", "backbone", "--unfreeze", "epoch:1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one log for the job, not one per process
    assert proc.stdout.count("test accuracy") == 1
    assert proc.stdout.count("epoch 2/2") == 1
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert unfreeze_events(rows) == [(2, "blocks.4")]
    assert {"best.pt", "last.pt", "report.png", "config.yaml"} <= {p.name for p in out.iterdir()}


@pytest.mark.multiprocess
def test_torchrun_feature_cache_matches_uncached_ddp(tmp_path):
    # each rank caches its block of images and the ranks exchange them; every rank then samples its shard of each
    # epoch exactly as uncached DDP does, so the two runs compute the same losses. --decode gpu runs the device
    # pipeline on the CPU: the cache builds through it and the uncached run trains from its DDP-sharded batches.
    data = make_image_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows, logs = {}, {}
    for cache in ("auto", "off", "disk"):
        out = tmp_path / cache
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "freezetune", "train", "--model", "timm:test_efficientnet", "--weights", "none", "--data", str(data),
            "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--no-progress", "--freeze", "backbone", "--aug", "none", "--cache", cache, "--decode", "gpu",
            "--out", str(out), *(["--cache-dir", str(tmp_path / "kept")] if cache == "disk" else []),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows[cache], logs[cache] = read_metrics(out / "metrics.csv"), proc.stdout
    assert "feature cache:" in logs["auto"] and "feature cache:" not in logs["off"]
    for key in ("train_loss", "val_loss", "train_acc"):
        for cached in ("auto", "disk"):
            got, want = [r[key] for r in rows[cached]], [r[key] for r in rows["off"]]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (cached, key)
    assert not (tmp_path / "disk" / "cache").exists()  # each rank cleared its folder; the shared one stayed, empty
    # --cache-dir is not used under torchrun: said (it was silent, and config.yaml records it)
    assert f"not read from nor kept in {tmp_path / 'kept'}: under torchrun each run builds its own" in logs["disk"]
    assert not (tmp_path / "kept").exists()


def test_a_torchrun_rank_ends_after_its_atexit_functions_without_the_interpreters_teardown(tmp_path):
    # the teardown aborted a rank whose run had finished (SIGABRT, no Python frame) and torchrun failed the job
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent("""
        import atexit, os
        from freezetune.cli import main as cli

        leave = os._exit
        os._exit = lambda code: (os.write(1, b" left at once"), leave(code))  # skips the interpreter's teardown
        atexit.register(print, "atexit ran")
        cli.main = lambda: 3
        print("unflushed", end="")
        cli.run()
    """)
    )
    for world, at_once in (("2", True), ("1", False)):  # a torchrun rank's environment; a process alone
        env = {**os.environ, "WORLD_SIZE": world}
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.startswith("unflushed") and "atexit ran" in proc.stdout, proc.stdout
        assert ("left at once" in proc.stdout) is at_once, (world, proc.stdout)


def test_dist_info_properties():
    info = DistInfo(rank=1, world=4, local_rank=1)
    assert info.enabled and not info.is_main


def _run_dir_rank(rank: int, port: int, out: str, answers: str) -> None:
    import torch.distributed as dist

    from freezetune.run import directory as runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank:  # only rank 0 may read or clear the run dir: the others take its answer
        runtime.prepare_run_dir = runtime._check_run_dir = lambda *a, **k: 1 / 0
    try:
        got = f"dir {runtime.shared_run_dir(out, 'm', DistInfo(rank, 2), resume=False, echo=lambda _: None)}"
    except Exception as exc:
        got = f"{type(exc).__name__} {exc}"
    Path(answers, f"rank{rank}").write_text(got)
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_rank_0_alone_checks_and_clears_the_run_dir_and_every_rank_takes_its_answer(tmp_path):
    # every rank checked the run dir while rank 0 cleared it: a re-run of an auto run stopped in a trial ended in a
    # gloo traceback in 3 of 5 tries (rank 1 read files being deleted, refused, and rank 0 waited for it)
    import socket

    import torch.multiprocessing as mp

    stopped, users = tmp_path / "stopped", tmp_path / "users"
    stopped.mkdir(), users.mkdir()
    (stopped / ".freezetune-run").write_text("")  # a run's folder
    (stopped / "classes.json").write_text('["a", "b"]')
    (stopped / "metrics.csv").write_text("epoch,epochs,train_loss,train_acc\n")  # stopped before its first epoch ended
    (users / "config.yaml").write_text("mine: 1\n")  # no run wrote it: refused
    for out in (stopped, users):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        answers = tmp_path / f"answers-{out.name}"
        answers.mkdir()
        mp.spawn(_run_dir_rank, args=(port, str(out), str(answers)), nprocs=2)
        got = [(answers / f"rank{r}").read_text() for r in (0, 1)]
        assert got[0] == got[1], got
        assert got[0] == f"dir {stopped}" if out is stopped else got[0].startswith("ConfigError "), got
    assert not (stopped / "metrics.csv").exists()  # rank 0 cleared it


# --- DDP proven: ranks agree, the unfrozen stage trains, resume is exact, decisions are shared --------------------

WORKER = Path(__file__).with_name("_ddp_worker.py")
# 36 training images in batches of 8 over two ranks; --aug standard: each rank draws its own augmentation
DDP_TRAIN = ["--model", "timm:test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "8",
             "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--aug", "standard"]  # fmt: skip
UNFREEZE_RUN = ["--epochs", "2", "--freeze", "backbone", "--unfreeze", "epoch:1"]


def torchrun(dump: Path, *train_args, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``freezetune train`` on two Gloo ranks through ``_ddp_worker.py``, each rank dumping its state into ``dump``."""
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(dump), "--", *DDP_TRAIN, *[str(a) for a in train_args]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          cwd=cwd, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rank_dumps(dump: Path) -> list[dict]:
    return [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A finished two-rank run: head only in epoch 1, ``blocks.4`` unfrozen (and DDP re-wrapped) for epoch 2."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(root / "data")
    out = root / "run"
    proc = torchrun(root / "dump", *UNFREEZE_RUN, "--data", data, "--out", out)
    return data, out, rank_dumps(root / "dump"), proc.stdout


@pytest.mark.multiprocess
def test_ranks_end_identical_after_training_through_an_unfreeze(ddp_run):
    _, out, (r0, r1), _ = ddp_run
    assert r0["events"] == r1["events"] == [(0, ["blocks.4"])]
    assert r0["trainable"] == r1["trainable"] and any(n.startswith("blocks.4.") for n in r0["trainable"])
    assert_same_state(r0["end"], r1["end"])  # every parameter and buffer (BatchNorm statistics included)
    assert_same_state(r0["end"], checkpoint.load(out / "last.pt")["state_dict"])


@pytest.mark.multiprocess
def test_the_unfrozen_stage_trains_after_the_rewrap_and_frozen_stages_do_not_move(ddp_run):
    _, _, (r0, _), _ = ddp_run
    start, end = r0["start"], r0["end"]

    def moved(prefix: str) -> list[str]:
        return [k for k in start if k.startswith(prefix) and not torch.equal(start[k], end[k])]

    assert moved("blocks.4.") and moved("classifier.")  # blocks.4 trained in epoch 2, after DDP re-wrapped the model
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")
    assert not [k for k in start if k.startswith(frozen) and not torch.equal(start[k], end[k])]


@pytest.mark.multiprocess
def test_the_final_test_is_sharded_and_equals_one_process_exactly(ddp_run):
    data, out, (r0, r1), stdout = ddp_run
    assert stdout.count("test accuracy") == 1
    written = json.loads((out / "test_metrics.json").read_text())
    assert r0["test"] == r1["test"] == written  # every rank holds the merged result; rank 0 wrote it
    single = evaluate_checkpoint(out / "best.pt", str(data), batch_size=8, device="cpu")
    assert single.pop("classes") == ["blue", "green", "red"] and single.pop("data").startswith("the test/ folder")
    # every count exact; the loss to float32 rounding: on some CPUs (AMD EPYC, oneDNN) a batch's logits differ in their
    # last bits with the batch's shape, and one image missing or counted twice would move it by a twelfth
    assert written.pop("loss") == pytest.approx(single.pop("loss"), rel=1e-6)
    epoch = written.pop("epoch")
    assert written.pop("checkpoint") == "best.pt" and epoch >= 1  # what the run scored
    assert single.pop("checkpoint") == str(out / "best.pt") and single.pop("epoch") == epoch  # what eval scored
    assert written == single and written["n"] == 12


@pytest.mark.multiprocess
def test_ranks_share_the_validation_and_get_one_process_metrics(ddp_run, tmp_path):
    # cached features (the run above: 12 validation images in one batch of 16) and images (batches of 8: 8 + 4)
    _, _, (r0, r1), _ = ddp_run
    assert [a + b for a, b in zip(r0["val_scored"], r1["val_scored"], strict=True)] == [12, 12]
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    torchrun(tmp_path / "dump", "--data", data, "--out", out, "--epochs", "1", "--freeze", "backbone", "--cache", "off")
    r0, r1 = rank_dumps(tmp_path / "dump")
    assert (r0["val_scored"], r1["val_scored"]) == ([8], [4])
    (row,) = read_metrics(out / "metrics.csv")
    single = evaluate_checkpoint(out / "last.pt", str(data / "val"), batch_size=8, device="cpu")
    assert (row["val_acc"], row["val_loss"]) == (single["acc"], pytest.approx(single["loss"], rel=1e-6))


@pytest.mark.multiprocess
def test_a_ddp_run_stopped_after_epoch_1_resumes_to_the_uninterrupted_result(ddp_run, tmp_path):
    data, whole, (w0, _), _ = ddp_run
    out = tmp_path / "run"
    torchrun(tmp_path / "stopped", *UNFREEZE_RUN, "--data", data, "--out", out, STOP_EPOCH="1")
    assert checkpoint.load(out / "last.pt")["epoch"] == 1 and not (tmp_path / "stopped" / "rank0.pt").exists()
    torchrun(tmp_path / "resumed", "--out", out, "--resume")
    r0, r1 = rank_dumps(tmp_path / "resumed")
    assert_same_state(r0["end"], r1["end"])
    assert_same_state(r0["end"], w0["end"])
    assert r0["events"] == w0["events"]  # the unfreeze after epoch 1 was re-applied, its groups re-created
    assert learning_curves(out) == learning_curves(whole)


def learning_curves(run_dir: Path) -> list[dict]:
    """What ``metrics.csv`` says the run learned, without its timings."""
    keep = ("unfrozen", "trainable_params", "train_", "val_", "lr/")
    rows = read_metrics(run_dir / "metrics.csv")
    return [{k: v for k, v in row.items() if k == "epoch" or k.startswith(keep)} for row in rows]


@pytest.mark.multiprocess
def test_ranks_share_early_stop_plateau_unfreeze_clipping_and_the_default_run_dir(tmp_path):
    # a learning rate too small to change a prediction, and BatchNorm statistics held (recomputed after each of these
    # short epochs, they changed the predictions of this random-init model): val_acc stalls, the plateau schedule
    # unfreezes blocks.4 (the one frozen stage) after epoch 3 (patience 2), which then gets the full early-stop
    # patience: the run stops early after epoch 5, every rank at the same point. Without --out each rank is made to
    # propose its own timestamped name (ranks reading the clock a second apart): rank 0's wins.
    data = make_image_folder(tmp_path / "data")
    dump = tmp_path / "dump"
    proc = torchrun(dump, "--data", data, "--epochs", "6", "--freeze", "blocks.4", "--unfreeze", "plateau:patience=2",
                    "--early-stop", "2", "--grad-clip", "0.01", "--lr", "1e-9", "--bn-stats", "frozen",
                    cwd=tmp_path, SKEW_RUN_DIR="1")  # fmt: skip
    r0, r1 = rank_dumps(dump)
    assert r0["epochs"] == r1["epochs"] == 5 and proc.stdout.count("early stop:") == 1  # (a note: "early stopping")
    assert r0["events"] == r1["events"] == [(2, ["blocks.4"])]
    assert r0["trainable"] == r1["trainable"]
    assert_same_state(r0["end"], r1["end"])
    runs = list((tmp_path / "runs").iterdir())
    assert [p.name.endswith("-rank0") for p in runs] == [True]
    assert r0["run_dir"] == r1["run_dir"] == str(runs[0].relative_to(tmp_path))
    assert unfreeze_events(read_metrics(runs[0] / "metrics.csv")) == [(4, "blocks.4")]


@pytest.mark.multiprocess
def test_the_auto_recipe_under_torchrun_takes_rank_0s_trials_and_decision(tmp_path):
    # rank 1 logged no metrics rows: its trial scored "n/a" on "0 validation images", it skipped the other trials
    # rank 0 ran, and the ranks hung in collectives that never met. 402 validation images, and trials of 12 steps a
    # rank (auto.trials.MIN_TRIAL_STEPS): every candidate's trial
    data = make_image_folder(tmp_path / "data", train=30, val=134, test=2, size=32)
    out, dump = tmp_path / "run", tmp_path / "dump"
    proc = torchrun(dump, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "2")
    decision = json.loads((out / "recipe.json").read_text())
    assert [t["trained_stages"] for t in decision["trials"]] == [2, 3, 4]
    assert all(t["n_val"] == 402 for t in decision["trials"])
    for k in (2, 3, 4):  # each trial and the choice said once, by rank 0
        assert proc.stdout.count(f"auto: last {k} stage(s) + head at lr") == 1, proc.stdout
    assert proc.stdout.count("auto: chose to train") == 1
    r0, r1 = rank_dumps(dump)
    assert r0["trainable"] == r1["trainable"] and r0["epochs"] == r1["epochs"] == decision["choice"]["epochs"]
    assert_same_state(r0["end"], r1["end"])


@pytest.mark.multiprocess
def test_an_auto_run_under_torchrun_with_a_budget_plans_its_pilot_and_epochs_by_rank_0s_clock(tmp_path):
    # each rank's clock differs: a pilot's pace or a short epoch planned by each rank apart would train apart, or hang
    data = make_image_folder(tmp_path / "data", size=32)
    out, dump = tmp_path / "run", tmp_path / "dump"
    proc = torchrun(dump, "--data", data, "--out", out, "--epochs", "2", "--budget", "0.01s")
    decision = json.loads((out / "recipe.json").read_text())
    assert decision["pilot"]["steps"] > 0 and len(re.findall(r"auto: the 0\.01s budget: a pilot of \d+ steps? trained",
                                                              proc.stdout)) == 1, proc.stdout  # fmt: skip
    assert proc.stdout.count("the run trains one epoch (not the 2 of epochs) of ") == 1, proc.stdout
    r0, r1 = rank_dumps(dump)
    assert r0["epochs"] == r1["epochs"] == decision["choice"]["epochs"] == 1
    assert_same_state(r0["end"], r1["end"])


def _torchrun_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The ``freezetune`` command itself on two Gloo ranks, as a user's job runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "freezetune",
           *[str(a) for a in args]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def test_a_sweep_under_torchrun_compares_its_recipes_once_and_writes_its_winner(tmp_path):
    # rank 1 read its empty history as "no validation data" after the first recipe and left; rank 0 died in gloo.
    # The phases' and the sweep's lines came once per rank
    data = make_image_folder(tmp_path / "data", size=32)
    proc = _torchrun_cli("sweep", *DDP_TRAIN, "--data", data, "--epochs", "1", "--recipes", "linear-probe,last-2",
                         "--out", tmp_path / "sw", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sweep: recipe linear-probe") == 1 and proc.stdout.count("sweep: recipe last-2") == 1
    assert proc.stdout.count("recipe last-2: phase 1/1") == 1 and "winner:" in proc.stdout, proc.stdout
    assert (tmp_path / "sw" / "winner.yaml").is_file() and len(
        (tmp_path / "sw" / "sweep.csv").read_text().splitlines()
    ) == 3


def test_a_user_error_under_torchrun_is_one_line_of_the_first_rank(tmp_path):
    # each rank printed it, and the ranks a stopped rank 0 left behind printed a gloo traceback
    for args in (("train", "--data", tmp_path / "nothere"), ("train", "--data", tmp_path, "--bogus-flag")):
        proc = _torchrun_cli(*args, "--device", "cpu", cwd=tmp_path)
        assert proc.returncode != 0
        ours = [line for line in proc.stderr.splitlines() if "error:" in line and "freezetune" in line]
        assert len(ours) == 1, proc.stderr[-3000:]
        # torchrun's own report of a failed job (its ChildFailedError) is all that follows: no rank's traceback
        assert proc.stderr.count("Traceback") <= 1 and "[rank" not in proc.stderr, proc.stderr[-3000:]


def test_the_images_an_epoch_visits_are_counted_as_the_ranks_share_them():
    # --epoch-images 5 on 2 ranks: each rank's 2.5 rounds to 2, so 4 trained, and the log said 5
    from freezetune.data import Loaders

    for world in (1, 2, 3):
        loaders = Loaders(batch_size=32, device=torch.device("cpu"), seed=0, preprocess=None, epoch_images=5,
                          dist=DistInfo(0, world))  # fmt: skip
        per_rank = len(loaders.order(60, train=True))
        assert loaders.epoch_items(60) == per_rank * world


@pytest.mark.multiprocess
def test_a_model_with_auxiliary_classifiers_trains_under_torchrun(tmp_path):
    # GoogLeNet's aux1/aux2 run in training and no loss reads them: DDP ended the second step waiting for their
    # gradients ("Expected to have finished reduction in the prior iteration")
    data = make_image_folder(tmp_path / "data", size=64)
    out = tmp_path / "run"
    proc = torchrun(tmp_path / "dump", "--data", data, "--out", out, "--epochs", "1", "--freeze", "none", "--cache",
                    "off", "--model", "torchvision:googlenet", "--img-size", "64")  # fmt: skip
    assert "test accuracy" in proc.stdout and (out / "best.pt").is_file(), proc.stdout[-2000:]


@pytest.mark.multiprocess
def test_a_feature_cache_over_fewer_images_than_processes_is_built(tmp_path):
    # one validation image, two ranks: "cannot build a feature cache over 1 image(s) with 2 processes: use fewer",
    # where --cache off trained (a rank of no rows now takes the store's shape from the other)
    import shutil

    data = make_image_folder(tmp_path / "data", val=1)
    for extra in sorted((data / "val").iterdir())[1:]:
        shutil.rmtree(extra)
    out = tmp_path / "run"
    torchrun(tmp_path / "dump", "--data", data, "--out", out, "--epochs", "1", "--freeze", "backbone")
    (row,) = read_metrics(out / "metrics.csv")
    single = evaluate_checkpoint(out / "last.pt", str(data / "val"), batch_size=8, device="cpu")
    assert single["n"] == 1 and row["val_acc"] == single["acc"], (row, single)


@pytest.mark.parametrize("nccl", [True, False])
def test_a_cuda_run_under_torchrun_joins_with_gloo_where_torch_has_no_nccl(monkeypatch, nccl):
    # Windows' torch has no NCCL: every CUDA run under torchrun there failed to start
    from freezetune.device import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    assert init_from_env("auto").world == 2
    assert joined == ["nccl" if nccl else "gloo"]
