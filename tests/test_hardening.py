"""The training CLI under bad input, divergence, interrupts and damaged files: clear lines, nothing lost."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import hyperfl_fast.runner as runner
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.checkpoint import load_checkpoint, state_digest
from hyperfl_fast.config import Config
from hyperfl_fast.models import cnn_spec
from hyperfl_fast.train import build_parser, main

from conftest import small_federation

SMALL = ["--dataset", "synthetic", "--clients", "3", "--local-size", "40", "--test-size", "20",
         "--local-epochs", "1", "--batch-size", "20", "--device", "cpu"]


def train_subprocess(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "hyperfl_fast.train", *SMALL, *args],
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs})


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- 1. batch larger than the data

def test_batch_larger_than_client_data_is_clamped_with_a_warning(tmp_path, capsys):
    assert main(SMALL + ["--batch-size", "100000", "--rounds", "1", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning: --batch-size 100000 exceeds a client's 40 training samples; each epoch is one batch of 40" in out


@pytest.mark.parametrize("method", ["hyperfl", "fedavg"])
def test_engines_agree_with_an_oversized_batch(method):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, clients = small_federation(clients=3, local_size=40)
        for c in clients:
            c.train_x, c.test_x = c.train_x.double(), c.test_x.double()
        cfg = Config(dataset="synthetic", method=method, clients=3, local_epochs=1, batch_size=100000,
                     device="cpu")
        engines = [build(cnn_spec(1, 10), clients, cfg, torch.device("cpu")) for build in
                   (build_reference, build_batched)]
        ref, batched = (e.run_round(0, [0, 1, 2]) for e in engines)
        for r, b in zip(ref, batched):
            assert b.train_loss == pytest.approx(r.train_loss, rel=1e-9) and b.local_acc == r.local_acc
    finally:
        torch.set_default_dtype(previous)


def test_batched_engine_never_pads_beyond_the_data():
    from hyperfl_fast.lockstep.data import RoundSchedule, StackedData

    _, clients = small_federation(clients=2, local_size=40)
    batches = list(RoundSchedule(StackedData(clients), [0, 1], 100000, 0, 0, range(1)).batches(0))
    assert len(batches) == 1 and batches[0].x.shape[1] == 40 and batches[0].valid.all()


# --------------------------------------------------------------------------- 2. divergence

def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_round(tmp_path, monkeypatch, capsys):
    real_prepare = runner.prepare

    def prepare_poisoned(cfg, log=print):
        engine, device = real_prepare(cfg, log)
        real_round = engine.run_round

        def run_round(round_idx, sampled, progress=iter):
            results = real_round(round_idx, sampled, progress)
            if round_idx == 1:  # round 2 blows up: a parameter becomes NaN
                engine.hypernet.fc.weight.data[0, 0] = float("nan")
            return results

        engine.run_round = run_round
        return engine, device

    monkeypatch.setattr(runner, "prepare", prepare_poisoned)
    assert main(SMALL + ["--rounds", "3", "--output-dir", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: round 2: training diverged (non-finite parameters global.fc.weight)")
    assert f"{tmp_path} keeps rounds 1-1" in err and "Try a smaller --lr (now 0.02)" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(saved["rounds"]) == 1 and torch.isfinite(saved["engine"]["global"]["fc.weight"]).all()


def test_a_real_divergence_is_caught(tmp_path, capsys):
    # fedavg at the largest allowed lr with heavy momentum blows up on this data within a few rounds
    code = main(SMALL + ["--method", "fedavg", "--lr", "10", "--momentum", "0.99", "--rounds", "5",
                         "--output-dir", str(tmp_path)])
    assert code == 3
    assert "training diverged (non-finite" in capsys.readouterr().err
    text = (tmp_path / "metrics.json").read_text() if (tmp_path / "metrics.json").exists() else "{}"
    json.loads(text)  # whatever was kept is strict JSON
    assert "NaN" not in text and "Infinity" not in text


def test_metrics_json_is_strict(tmp_path):
    from hyperfl_fast.checkpoint import write_json

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None], "c": 2}


# --------------------------------------------------------------------------- 3. output folders

@pytest.mark.parametrize("where,message", [
    ("file", "exists and is not a folder"),
    ("under-a-file", "cannot write there"),
    ("/sys", "cannot write there"),  # exists, but even root cannot create files in it
])
def test_unwritable_output_folder_is_refused_before_any_work(where, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    target = {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "run", "/sys": "/sys"}[where]
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("work started"))
    assert main(SMALL + ["--output-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {target}: {message}") and err.count("\n") == 1


# --------------------------------------------------------------------------- 4. checkpoints

@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(SMALL + ["--rounds", "1", "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:len(raw) // 2], "is not a readable checkpoint"),
    (lambda raw: b"", "is not a readable checkpoint"),
    (lambda raw: b"this is a text file\n", "is not a readable checkpoint"),
    (lambda raw: os.urandom(4096), "is not a readable checkpoint"),
])
def test_damaged_checkpoint_is_one_clear_line(damage, message, finished_run, capsys):
    path = finished_run / "checkpoint.pt"
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(finished_run)
    assert main(SMALL + ["--rounds", "2", "--resume", "--output-dir", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} {message}") and err.count("\n") == 1
    assert "delete it to start afresh" in err
    assert snapshot(finished_run) == before  # nothing touched


def test_checkpoint_with_flipped_weight_bytes_fails_its_integrity_check(finished_run, capsys):
    path = finished_run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["engine"]["global"]["heads.weight"].view(-1)[1000:1010] = torch.frombuffer(
        bytearray(os.urandom(40)), dtype=torch.float32)
    torch.save(state, path)  # a well-formed file whose weights no longer match the digest
    assert main(SMALL + ["--rounds", "2", "--resume", "--output-dir", str(finished_run)]) == 2
    assert "failed its integrity check (checksum mismatch" in capsys.readouterr().err


def test_digest_covers_every_part():
    state = {"config": {"lr": 0.1}, "engine": {"w": torch.ones(3)}, "rounds": [{"round": 1}]}
    base = state_digest(state)
    assert state_digest({**state, "config": {"lr": 0.2}}) != base
    assert state_digest({**state, "engine": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}}) != base
    assert state_digest({**state, "rounds": []}) != base
    assert state_digest(dict(state)) == base


def test_resume_without_checkpoint_says_so(tmp_path, capsys):
    assert main(SMALL + ["--rounds", "1", "--resume", "--output-dir", str(tmp_path)]) == 0
    assert f"note: --resume: no checkpoint in {tmp_path}; starting from round 1" in capsys.readouterr().out


def test_stale_tmp_checkpoint_is_cleaned(finished_run, capsys):
    (finished_run / "checkpoint.tmp").write_bytes(b"half a checkpoint")
    assert main(SMALL + ["--rounds", "2", "--resume", "--output-dir", str(finished_run)]) == 0
    assert not (finished_run / "checkpoint.tmp").exists()
    assert "removed" in capsys.readouterr().out


# --------------------------------------------------------------------------- 5. Ctrl-C

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_prints_one_line_and_resume_continues(tmp_path, sig):
    """The round log goes to a file, not a pipe nobody reads while the run goes on (a full pipe blocks the
    child in a write, and its exit in the final flush): the one thing waited for after the signal is the run."""
    out = tmp_path / "run"
    with open(tmp_path / "stdout.log", "w") as log:
        proc = train_subprocess(["--rounds", "500", "--output-dir", str(out)], stdout=log)
        deadline = time.time() + 120
        while time.time() < deadline and runner.completed_rounds(out) < 2:
            time.sleep(0.2)
        assert runner.completed_rounds(out) >= 2, "the run did not get going"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr
    done = runner.completed_rounds(out)
    assert lines[0].startswith(f"interrupted in round {done + 1}: rounds 1-{done} are saved in {out}")
    assert load_checkpoint(out / "checkpoint.pt", torch.device("cpu"))[0]["rounds"] == \
        json.loads((out / "metrics.json").read_text())["rounds"]  # checkpoint and metrics agree
    assert lines[0].endswith("--resume") and "--rounds 500" in lines[0]
    assert main(SMALL + ["--rounds", str(done + 1), "--resume", "--output-dir", str(out)]) == 0
    assert runner.completed_rounds(out) == done + 1


# --------------------------------------------------------------------------- 6. overwriting results

def test_new_run_never_overwrites_another_runs_results(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(SMALL + ["--rounds", "1", "--lr", "0.05", "--output-dir", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert "holds another run's results; pass --resume to continue it, --overwrite to replace it" in err
    assert snapshot(finished_run) == before
    assert main(SMALL + ["--rounds", "1", "--lr", "0.05", "--overwrite", "--output-dir", str(finished_run)]) == 0
    assert json.loads((finished_run / "metrics.json").read_text())["config"]["lr"] == 0.05


# --------------------------------------------------------------------------- 7. messages

def test_help_shows_one_default_per_flag_and_names_fmnist(capsys):
    text = build_parser().format_help()
    text = text[text.index("options:"):]  # past the usage lines
    local = text[text.index("--local-size"):text.index("--test-size")]
    assert local.count("default") == 1
    data_dir = text[text.index("--data-dir"):text.index("--output-dir")]
    assert "fashion-mnist" in data_dir


def test_log_file_has_no_progress_bar_leftovers(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "hyperfl_fast.train", *SMALL, "--rounds", "2",
                               "--output-dir", str(tmp_path / "run")], stdout=f, stderr=subprocess.STDOUT,
                              timeout=300)
    assert proc.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text and "epoch/s" not in text
    assert [line for line in text.splitlines() if line.startswith("round")][0].startswith("round    1/2 |")


def test_bad_ops_path_variable_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYPERFL_OPS_PATH", "cuda")
    assert main(SMALL + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: HYPERFL_OPS_PATH must be one of reference, torch, triton, or op=path pairs such as "
                   "conv=triton, got 'cuda'\n")
    assert not (tmp_path / "run").exists()


def test_bad_precision_variable_does_not_break_the_import():
    code = "import hyperfl_fast.ops as ops; print(ops.get_precision())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HYPERFL_PRECISION": "fp8"})
    assert proc.returncode == 0 and proc.stdout.strip() == "fp32"
    assert "HYPERFL_PRECISION must be one of fp32, tf32, got 'fp8'; using fp32" in proc.stderr


def test_checkpoints_are_written_in_the_background_from_a_snapshot(tmp_path, monkeypatch):
    """The state is copied before submit() returns (later in-place updates do not leak into the file), close()
    waits for the write, and a failed write is raised by the next call instead of being lost."""
    import threading

    from hyperfl_fast import checkpoint as ckpt

    release = threading.Event()
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda path, state: release.wait(5) and real_save(path, state))
    writer = ckpt.BackgroundWriter()
    weights = torch.ones(3)
    written = []
    writer.submit(tmp_path / "c.pt", {"config": {}, "engine": {"w": weights}, "rounds": [1]},
                  then=lambda: written.append("metrics"))
    weights.add_(1.0)  # the next round's update, while the write is in flight
    release.set()
    writer.close()
    state, verified = ckpt.load_checkpoint(tmp_path / "c.pt", torch.device("cpu"))
    assert verified and torch.equal(state["engine"]["w"], torch.ones(3)) and written == ["metrics"]

    monkeypatch.setattr(ckpt, "save_checkpoint", lambda path, state: (_ for _ in ()).throw(OSError("disk full")))
    writer.submit(tmp_path / "d.pt", {"config": {}, "engine": {}, "rounds": []})
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_a_second_interrupt_stops_at_once(tmp_path):
    """Pressing Ctrl-C twice does not wait for anything (e.g. a slow checkpoint write)."""
    code = ("import time\nfrom hyperfl_fast.interrupts import graceful_interrupts\n"
            "with graceful_interrupts():\n"
            "    try:\n        print('ready', flush=True)\n        time.sleep(60)\n"
            "    except KeyboardInterrupt:\n        print('saving', flush=True)\n        time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "saving\n"  # the first one is a KeyboardInterrupt the program handles
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted again: stopping at once" in stderr
