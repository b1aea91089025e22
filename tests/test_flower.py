"""HyperFL on Flower, as a real deployment on loopback: a SuperLink and three SuperNodes as separate processes.

The tests start ``flower-superlink`` and ``flower-supernode`` (insecure, free ports chosen at run time), submit
the app with ``flwr run`` and always stop every process they started.  Small model (hidden-dim 16) and
synthetic data keep a round to seconds.
"""
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperfl_fast.checkpoint import load_checkpoint
from hyperfl_fast.config import Config
from hyperfl_fast.methods import get_method
from hyperfl_fast.models import cnn_spec
from hyperfl_fast.runner import prepare

pytest.importorskip("flwr")  # installed by `make test`; the extra is hyperfl_fast[flower]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr (and flower-superexec, which they start)
SETTINGS = dict(dataset="synthetic", clients=3, rounds=2, local_epochs=1, batch_size=20, local_size=60, test_size=40,
                hidden_dim=16, device="cpu")


def replying(node: int):
    """A fake Flower reply's metadata: from ``node``, answering a message the strategy did not push."""
    from types import SimpleNamespace

    return SimpleNamespace(src_node_id=node, reply_to_message_id="")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Kill a process and everything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@contextlib.contextmanager
def deployment(tmp_path: Path, nodes: int = 3, simulation: bool = False):
    """A SuperLink and ``nodes`` SuperNodes on loopback; yields (env for `flwr run`, the SuperNode processes, a
    function that restarts the SuperLink: killed, then started again on its port and with its state database).
    With ``simulation``, a SuperLink in simulation mode (the README's command) and no SuperNodes: `flwr run`
    then asks for virtual ones with --federation-config."""
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HYPERFL_NODE_STATE_DIR": str(tmp_path / "node-state"),  # where nodes without a state-dir write
           "PYTHONUNBUFFERED": "1"}  # a killed process's log keeps its last lines
    processes = []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                          env=env, cwd=tmp_path, start_new_session=True))
        return processes[-1]

    superlink = ("flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(port),
                 "--database", str(tmp_path / "superlink.db"), *(["--simulation"] if simulation else []))

    def restart_superlink():
        stop(processes.pop(0))  # its ServerApp dies with it
        start("superlink-restarted", *superlink)

    try:
        start("superlink", *superlink)
        supernodes = [start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                            "--port", str(free_port()), "--node-config",
                            f'partition-id={i} num-partitions={nodes} state-dir="{tmp_path / f"node{i}"}"')
                      for i in range(0 if simulation else nodes)]
        yield env, supernodes, restart_superlink
    finally:
        for process in reversed(processes):
            stop(process)


def log_tails(tmp_path: Path, lines: int = 15) -> str:
    """The last lines of every process log of a deployment, for a failure message."""
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                     for log in sorted(tmp_path.glob("*.log")))


def run_config(out: Path, **extra) -> str:
    values = {**SETTINGS, "output_dir": str(out), "audit_uploads": True, "client_metrics": True, **extra}
    return " ".join(f"{k.replace('_', '-')}={json.dumps(v)}" for k, v in values.items())


def flwr_run(env: dict, config: str, federation_config: str | None = None) -> subprocess.Popen:
    extra = ["--federation-config", federation_config] if federation_config else []
    return subprocess.Popen([str(BIN / "flwr"), "run", ".", "loopback", "--stream", "--run-config", config, *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def reference_global_state(rounds_clients: list[list[int]], method: str = "hyperfl") -> dict:
    """The in-process reference engine's global state (HyperFL: the hypernetwork) after the given rounds (sampled
    clients each)."""
    engine, _ = prepare(Config(**SETTINGS, method=method, engine="reference"), log=lambda _: None)
    for round_idx, sampled in enumerate(rounds_clients):
        engine.run_round(round_idx, sampled)
    return engine.global_state()


def read_audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "uploads.jsonl").read_text().splitlines()]


def assert_equal_states(got: dict, want: dict) -> None:
    """Equal to float32 tolerance: separate processes may use other thread counts, hence other summation orders,
    and HyperFL's large first steps grow such rounding (the engines agree to 1e-9 in float64).  The server sums
    the uploads in partition order; in arrival order a last-bit difference grew to 3e-4 in round 2."""
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=2e-5)


# Once in about ten runs (seen 2026-12-01, flwr 1.42) the resumed run got no reply at all within 400 s.  The cause
# is not known: the nodes' logs were buffered and lost (they are unbuffered now).  A provoked second restart in
# the middle of a resumed round showed one way it can happen: a reconnected SuperNode whose heartbeat lapsed
# ("Node Unavailable").  The test gives the scenario one more try in a fresh deployment (pytest-rerunfailures),
# and a hang fails within 180 s with every process's log.
@pytest.mark.flaky(reruns=1)
def test_hyperfl_on_a_loopback_deployment_resumed_after_a_superlink_restart(tmp_path):
    """Two HyperFL rounds over 3 SuperNodes; after round 1 the SuperLink is killed (its ServerApp with it) and
    restarted on its state database: the SuperNodes stay, and `flwr run` with resume=true continues from the
    server's checkpoint, the nodes from their private states of the first run (a node that trained round 2 before
    the SuperLink died goes back to its state after round 1).  The result equals the reference engine's."""
    out = tmp_path / "out"
    start = time.perf_counter()
    with deployment(tmp_path) as (env, _, restart_superlink):
        process = flwr_run(env, run_config(out, client_metrics=False))
        try:
            deadline = time.time() + 300
            while not (out / "global.pt").exists() and time.time() < deadline and process.poll() is None:
                time.sleep(0.2)  # round 1 is aggregated and saved; round 2 takes more than 10 s
            assert (out / "global.pt").exists(), process.communicate(timeout=60)[0][-3000:]
            restart_superlink()
            process.communicate(timeout=120)
            process = flwr_run(env, run_config(out, client_metrics=False, resume=True))
            try:
                log, _ = process.communicate(timeout=180)  # about 20 s when all is well
            except subprocess.TimeoutExpired:
                stop(process)
                pytest.fail("the resumed run got no reply within 180 s\n" + (process.communicate()[0] or "")[-2000:]
                            + log_tails(tmp_path))
        finally:
            stop(process)
    print(f"loopback deployment, 2 HyperFL rounds and a SuperLink restart: {time.perf_counter() - start:.1f} s")
    assert "resumed" in log and "after round 1" in log, log[-3000:]

    # every reply the server received held the hypernetwork's arrays and nothing else
    audit = read_audit(out)
    assert sorted((a["round"], a["partition-id"]) for a in audit) == [(r, c) for r in (1, 2) for c in range(3)]
    for upload in audit:
        assert set(upload["arrays"]) == {"fc.weight", "fc.bias", "heads.weight", "heads.bias"}
        assert not any(k.startswith(("embedding", "classifier")) for k in upload["arrays"])
    # each client's private state lived on from round 1 to round 2 (on the node's disk, under the first run's id):
    # a node that started afresh would make round 2 differ from the reference below
    assert [len(list((tmp_path / f"node{i}").glob("run-*/partition-?.pt"))) for i in range(3)] == [1, 1, 1]

    # the global hypernetwork equals the in-process reference run's
    saved, verified = load_checkpoint(out / "global.pt", torch.device("cpu"))
    assert verified and len(saved["rounds"]) == 2
    assert_equal_states(saved["engine"]["global"], reference_global_state([[0, 1, 2], [0, 1, 2]]))

    # the same metrics files as python -m hyperfl_fast.train, each round once across the restart
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["headline"]["metric"] == "local_acc"
    assert [c["client"] for c in metrics["rounds"][1]["clients"]] == [0, 1, 2]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("round,train_loss,local_acc")


def test_hyperfl_in_flowers_simulation_engine(tmp_path):
    """The README's simulation: a SuperLink in simulation mode, 3 virtual SuperNodes in Ray (`flwr run
    --federation-config num-supernodes=3`), 2 rounds; the global hypernetwork equals the reference engine's."""
    out = tmp_path / "out"
    with deployment(tmp_path, simulation=True) as (env, _, _):
        process = flwr_run(env, run_config(out, audit_uploads=False), federation_config="num-supernodes=3")
        try:
            log, _ = process.communicate(timeout=400)
        finally:
            stop(process)
    assert (out / "global.pt").exists(), log[-3000:]
    saved, verified = load_checkpoint(out / "global.pt", torch.device("cpu"))
    assert verified and [r["round"] for r in saved["rounds"]] == [1, 2]
    assert [c["client"] for c in saved["rounds"][1]["clients"]] == [0, 1, 2]
    assert_equal_states(saved["engine"]["global"], reference_global_state([[0, 1, 2], [0, 1, 2]]))
    assert len(list((tmp_path / "node-state").glob("run-*/partition-?.pt"))) == 3  # each virtual node's state


def test_pfedhn_on_a_loopback_deployment(tmp_path):
    """pFedHN's server-side hypernetwork over 3 SuperNodes, 2 rounds: each node receives the weights generated for
    its partition and uploads their change (nothing else), and the server's hypernetwork and embeddings equal the
    reference engine's."""
    out = tmp_path / "out"
    with deployment(tmp_path) as (env, _, _):
        process = flwr_run(env, run_config(out, method="pfedhn", client_metrics=False))
        try:
            log, _ = process.communicate(timeout=400)
        finally:
            stop(process)
    assert (out / "global.pt").exists(), log[-3000:]
    audit = read_audit(out)
    assert sorted((a["round"], a["partition-id"]) for a in audit) == [(r, c) for r in (1, 2) for c in range(3)]
    model = {name for name, _ in cnn_spec(1, 10).cnn_shapes()}  # the whole CNN's change, as the server sent it
    assert all(set(a["arrays"]) == model for a in audit)
    saved, verified = load_checkpoint(out / "global.pt", torch.device("cpu"))
    assert verified and [r["round"] for r in saved["rounds"]] == [1, 2]
    assert_equal_states(saved["engine"]["global"], reference_global_state([[0, 1, 2], [0, 1, 2]], "pfedhn"))


def test_a_supernode_that_dies_in_round_2(tmp_path):
    """The server gets the dead node's error reply (its heartbeat lapses, about 60 s) or waits round-timeout
    seconds, then aggregates the replies it has (at least min-clients) and
    records the failure; the result is the reference's round 2 over the surviving clients."""
    out = tmp_path / "out"
    with deployment(tmp_path) as (env, supernodes, _):
        process = flwr_run(env, run_config(out, client_metrics=False, min_clients=2, round_timeout=30))
        try:
            deadline = time.time() + 300
            audit = out / "uploads.jsonl"  # round 1's three uploads arrived: client 2's node dies as round 2 begins
            while (not audit.exists() or len(audit.read_text().splitlines()) < 3) and time.time() < deadline \
                    and process.poll() is None:
                time.sleep(0.2)
            stop(supernodes[2])
            log, _ = process.communicate(timeout=400)
        finally:
            stop(process)
    assert (out / "metrics.json").exists(), log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2, log[-3000:]
    first, second = metrics["rounds"]
    assert [c["client"] for c in second["clients"]] == [0, 1]
    # the failure names the dead node and its partition (no reply at all, or an error reply from the SuperLink)
    assert second["failures"] and all("(partition 2)" in f for f in second["failures"]), second["failures"]
    assert any(f.startswith("train: ") for f in second["failures"])
    assert not first["failures"]
    saved, _ = load_checkpoint(out / "global.pt", torch.device("cpu"))
    assert_equal_states(saved["engine"]["global"], reference_global_state([[0, 1, 2], [0, 1]]))


def test_secure_aggregation_on_a_loopback_deployment_with_a_node_lost_while_it_trains(tmp_path):
    """Flower's SecAgg+ over 3 SuperNodes: the server gets no array from any node, only the mean.  Node 2 cannot
    write its state (its state-dir is a file), so it fails while it trains, after sharing its keys: the others'
    shares remove its masks and the round goes on over nodes 0 and 1, equal to plain aggregation within one
    quantisation step.  (Drop-outs in every stage, over two rounds: test_secure_aggregation.py.)"""
    from test_secure_aggregation import STEP

    out = tmp_path / "out"
    (tmp_path / "node2").write_text("not a folder")
    start = time.perf_counter()
    with deployment(tmp_path) as (env, _, _):
        process = flwr_run(env, run_config(out, client_metrics=False, min_clients=2, rounds=1,
                                           secure_aggregation=True))
        try:
            log, _ = process.communicate(timeout=400)
        finally:
            stop(process)
    print(f"loopback deployment, 1 HyperFL round with secure aggregation: {time.perf_counter() - start:.1f} s")
    assert (out / "metrics.json").exists(), log[-3000:]
    [only] = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [c["client"] for c in only["clients"]] == [0, 1], log[-3000:]
    assert len(only["failures"]) == 1 and "NotADirectoryError" in only["failures"][0]
    assert only["failures"][0].startswith("secure aggregation, collect masked vectors: node ")
    assert [(a["partition-id"], a["arrays"]) for a in read_audit(out)] == [(0, {}), (1, {})]  # nothing in the clear
    saved, verified = load_checkpoint(out / "global.pt", torch.device("cpu"))
    assert verified
    want = reference_global_state([[0, 1]])
    for name, tensor in want.items():
        torch.testing.assert_close(saved["engine"]["global"][name], tensor, rtol=0, atol=STEP)


def test_too_few_replies_stop_the_run_keeping_the_last_round(tmp_path):
    from hyperfl_fast.flower.server_app import FederationError, UploadAuditingFedAvg
    from hyperfl_fast.flower.settings import settings_from_run_config

    settings = settings_from_run_config({"dataset": "synthetic", "clients": 3, "min-clients": 2,
                                         "output-dir": str(tmp_path)})
    strategy = UploadAuditingFedAvg(settings, {"fc.weight": (16, 64)})
    with pytest.raises(FederationError, match=r"round 2: 0 train replies of 2, fewer than min-clients=2"):
        strategy.aggregate_train(2, [])


def test_a_resumed_server_goes_on_from_its_checkpoint_or_refuses_in_one_line(tmp_path, server_identity):
    """What the checkpoint keeps besides the global state (rounds aggregated per partition, the DP accountants,
    the first run's id, a round still waiting for its folded evaluation) comes back with resume=true, and this
    run's rounds are counted on from it; a checkpoint of other settings, or of an older version, is one line."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from hyperfl_fast.checkpoint import save_checkpoint
    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.engines import STATE_FORMAT
    from hyperfl_fast.flower.server_app import UploadAuditingFedAvg, initial_global_state, resumed_checkpoint
    from hyperfl_fast.flower.settings import EVALUATE_RECEIVED, STATE_RUN_ID, settings_from_run_config

    run_config = {"dataset": "synthetic", "clients": 3, "rounds": 4, "method": "dp-fedavg", "epsilon": 50.0,
                  "min-clients": 2, "output-dir": str(tmp_path)}
    settings = settings_from_run_config(run_config)
    first = UploadAuditingFedAvg(settings, {"w": (5,)}, run_id=11)
    replies = [SimpleNamespace(has_error=lambda: False, metadata=replying(pid + 1), content=RecordDict(
        {"arrays": ArrayRecord({"w": torch.randn(5)}), "metrics": MetricRecord({"num-examples": 60,
                                                                              "partition-id": pid})}))
               for pid in range(3)]
    first.current = {"w": torch.zeros(5)}
    for server_round in (1, 2):
        first.aggregate_train(server_round, replies[:3 - server_round + 1])  # round 2 without partition 2
    state = first.server_state(2)
    engine = {"format": STATE_FORMAT, "method": "dp-fedavg", "global": initial_global_state(settings.cfg),
              "clients": []}
    save_checkpoint(tmp_path / "global.pt", {"config": settings.cfg.to_dict(), "rounds": first.rounds,
                                             "engine": engine, "flower": state})

    resumed = UploadAuditingFedAvg(settings, {"w": (5,)}, run_id=12)
    saved = resumed_checkpoint(settings_from_run_config({**run_config, "resume": True}))
    resumed.resume(saved["rounds"], saved["flower"])
    assert resumed.offset == 2 and resumed.rounds_aggregated == [2, 2, 1] and resumed.state_run_id == 11
    assert {pid: p.epsilons() for pid, p in resumed.privacy.items()} == \
        {pid: p.epsilons() for pid, p in first.privacy.items()}
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2, 3])
    [sent] = [m.content["config"] for m in resumed.configure_train(1, ArrayRecord({"w": torch.zeros(5)}),
                                                                    ConfigRecord({}), grid)][:1]
    assert sent["server-round"] == 3 and sent[STATE_RUN_ID] == 11  # this run's round 1 is the run's round 3

    assert state["pending"] is None  # no figures asked for: every round is recorded when it is aggregated

    # with folded evaluation the last round waits for the next train replies' figures: recorded once, after resume
    folded = settings_from_run_config({**run_config, "method": "hyperfl", "client-metrics": True})
    scored = [SimpleNamespace(has_error=r.has_error, metadata=r.metadata, content=RecordDict(
        {"arrays": r.content["arrays"], "metrics": MetricRecord({**r.content["metrics"], "global-acc": 50.0})}))
              for r in replies]
    before = UploadAuditingFedAvg(folded, {"w": (5,)})
    before.current = {"w": torch.zeros(5)}
    before.aggregate_train(1, scored)
    assert before.rounds == [] and before.server_state(1)["pending"]["round"] == 1
    after = UploadAuditingFedAvg(folded, {"w": (5,)})
    after.resume([], before.server_state(1))
    [message, *_] = after.configure_train(1, ArrayRecord({"w": torch.zeros(5)}), ConfigRecord({}), grid)
    assert message.content["config"][EVALUATE_RECEIVED]
    after.aggregate_train(1, scored)
    assert [r["round"] for r in after.rounds] == [1] and after.rounds[0]["global_acc"] == 50.0
    plain = UploadAuditingFedAvg(settings_from_run_config({**run_config, "method": "hyperfl"}), {"w": (5,)})
    plain.resume([], before.server_state(1))  # resumed without figures: round 1 is recorded at once
    assert [r["round"] for r in plain.rounds] == [1] and plain.pending is None

    with pytest.raises(ConfigError, match=r"^run config: resume: .*global.pt was written with different settings "
                                          r"\(lr\); use the same flags or another output-dir$"):
        resumed_checkpoint(settings_from_run_config({**run_config, "resume": True, "lr": 0.5}))
    misfits = {  # an older model's server state -> what the one-line error says of it
        "wrong shape": ({**engine["global"], "fc1.weight": torch.zeros(3, 3)},
                        r"the server's state: fc1.weight is \(3, 3\), this run's \(\d+, \d+\)"),
        "renamed": ({("fc9.weight" if k == "fc1.weight" else k): t for k, t in engine["global"].items()},
                    r"the server's state lacks fc1.weight \(1 in all\); has what this run does not: fc9.weight "
                    r"\(1 in all\)")}
    for saved_global, says in misfits.values():
        save_checkpoint(tmp_path / "global.pt", {"config": settings.cfg.to_dict(), "rounds": first.rounds,
                                                 "engine": {**engine, "global": saved_global}, "flower": state})
        with pytest.raises(ConfigError, match=rf"global.pt does not fit this run's model \({says}\); delete it to "
                                              r"start afresh, or set another output-dir$"):
            resumed_checkpoint(settings_from_run_config({**run_config, "resume": True}))
    save_checkpoint(tmp_path / "global.pt", {"config": settings.cfg.to_dict(), "rounds": [], "engine": engine})
    with pytest.raises(ConfigError, match=r"global.pt is not a hyperfl_fast checkpoint .*; delete it to start "
                                          r"afresh, or set another output-dir$"):  # written before resume
        resumed_checkpoint(settings_from_run_config({**run_config, "resume": True}))


def test_aggregation_does_not_depend_on_arrival_order(tmp_path):
    """FedAvg sums float32 uploads in the order of the replies; the server sorts them by partition first."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from hyperfl_fast.flower.server_app import UploadAuditingFedAvg
    from hyperfl_fast.flower.settings import settings_from_run_config

    settings = settings_from_run_config({"dataset": "synthetic", "clients": 3, "output-dir": str(tmp_path)})
    generator = torch.Generator().manual_seed(0)
    replies = [SimpleNamespace(has_error=lambda: False, metadata=replying(pid + 1),
                               content=RecordDict({"arrays": ArrayRecord({"w": torch.randn(999, generator=generator)
                                                                          * 10 ** pid}),
                                                   "metrics": MetricRecord({"num-examples": 60 + 7 * pid,
                                                                            "partition-id": pid})}))
               for pid in range(3)]
    seen = []  # (partition, what it was sent) as the upload hook sees them
    strategy = UploadAuditingFedAvg(settings, {"w": (999,)},
                                    on_upload=lambda _, pid, upload, received: seen.append((pid, received)))
    strategy.current = {"w": torch.ones(999)}  # the global state this round sent every node
    in_order = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()["w"]
    assert [pid for pid, _ in seen] == [0, 1, 2] and all(received is strategy.current for _, received in seen)
    reversed_order = strategy.aggregate_train(1, replies[::-1])[0].to_torch_state_dict()["w"]
    assert torch.equal(in_order, reversed_order)
    weights = torch.tensor([60.0, 67.0, 74.0]) / 201
    want = sum(w * r.content["arrays"].to_torch_state_dict()["w"] for w, r in zip(weights, replies))
    torch.testing.assert_close(in_order, want)


def test_evaluation_rides_on_the_next_train_message_and_figures_are_opt_in(tmp_path, server_identity):
    """client-metrics with frac 1: round r's aggregated state is evaluated when it arrives to train round r + 1
    (one ClientApp process per node and round, not two), and only the last round has an evaluate message;
    without client-metrics nothing is evaluated and each round is recorded when its uploads are aggregated."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from hyperfl_fast.flower.server_app import FederationError, UploadAuditingFedAvg
    from hyperfl_fast.flower.settings import EVALUATE_RECEIVED, settings_from_run_config


    class Grid:
        def get_node_ids(self):
            return [1, 2]

    def replies(metrics):
        return [SimpleNamespace(has_error=lambda: False, metadata=replying(pid + 1),
                                content=RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}), "metrics":
                                                    MetricRecord({"num-examples": 60, "partition-id": pid,
                                                                  **metrics(pid)})}))
                for pid in range(2)]

    base = {"dataset": "synthetic", "clients": 2, "rounds": 2}
    for folder in ("figures", "quiet"):  # the server's output folders (run_federation makes them)
        (tmp_path / folder).mkdir()
    figures = {"client-metrics": True, "output-dir": str(tmp_path / "figures")}
    strategy = UploadAuditingFedAvg(settings_from_run_config({**base, **figures}), {"w": (3,)})
    arrays = ArrayRecord({"w": torch.zeros(3)})
    (first,) = {m.content["config"].get(EVALUATE_RECEIVED) for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                                                             Grid())}
    strategy.aggregate_train(1, replies(lambda pid: {"train-loss": 1.0 + pid, "local-acc": 50.0}))
    assert first is None and list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Grid())) == []
    assert strategy.aggregate_evaluate(1, []) is None and strategy.rounds == []
    (second,) = {m.content["config"][EVALUATE_RECEIVED] for m in strategy.configure_train(2, arrays, ConfigRecord(),
                                                                                          Grid())}
    strategy.aggregate_train(2, replies(lambda pid: {"train-loss": 0.5, "local-acc": 60.0, "global-acc": 40.0 + pid}))
    assert second is True and [r["round"] for r in strategy.rounds] == [1]  # round 1, evaluated by round 2's replies
    assert [c["global_acc"] for c in strategy.rounds[0]["clients"]] == [40.0, 41.0]
    assert [c["train_loss"] for c in strategy.rounds[0]["clients"]] == [1.0, 2.0]
    assert len(list(strategy.configure_evaluate(2, arrays, ConfigRecord(), Grid()))) == 2  # the last round
    evaluated = [SimpleNamespace(has_error=lambda: False, metadata=replying(pid + 1),
                                 content=RecordDict({"metrics": MetricRecord({"num-examples": 40, "partition-id": pid,
                                                                              "global-acc": 70.0})}))
                 for pid in range(2)]
    strategy.aggregate_evaluate(2, evaluated)
    assert [r["global_acc"] for r in strategy.rounds] == [40.5, 70.0] and strategy.rounds[1]["local_acc"] == 60.0

    # a node that fails in round 2 has no global accuracy in round 1's record (it evaluates with round 2's train)
    lost = UploadAuditingFedAvg(settings_from_run_config({**base, **figures, "min-clients": 1}), {"w": (3,)})
    lost.aggregate_train(1, replies(lambda pid: {"train-loss": 1.0, "local-acc": 50.0}))
    lost.aggregate_train(2, replies(lambda pid: {"train-loss": 0.5, "local-acc": 60.0, "global-acc": 40.0})[:1])
    assert [c["global_acc"] for c in lost.rounds[0]["clients"]] == [40.0, None]

    stopped = UploadAuditingFedAvg(settings_from_run_config({**base, **figures, "rounds": 3}), {"w": (3,)})
    stopped.aggregate_train(1, replies(lambda pid: {"train-loss": 1.0, "local-acc": 50.0}))
    with pytest.raises(FederationError, match=r"round 2: 0 train replies .* keeps rounds 1-1$"):
        stopped.aggregate_train(2, [])  # round 1 finished: it is recorded, without its evaluation
    assert [r["round"] for r in stopped.rounds] == [1] and stopped.rounds[0]["global_acc"] is None

    quiet = UploadAuditingFedAvg(settings_from_run_config({**base, "output-dir": str(tmp_path / "quiet")}),
                                 {"w": (3,)})
    for server_round in (1, 2):
        assert all(EVALUATE_RECEIVED not in m.content["config"]
                   for m in quiet.configure_train(server_round, arrays, ConfigRecord(), Grid()))
        quiet.aggregate_train(server_round, replies(lambda pid: {}))
        assert list(quiet.configure_evaluate(server_round, arrays, ConfigRecord(), Grid())) == []
    assert [r["round"] for r in quiet.rounds] == [1, 2] and quiet.rounds[1]["local_acc"] is None
    assert json.loads((tmp_path / "quiet" / "metrics.json").read_text())["rounds"][1]["round"] == 2


def test_nodes_with_another_num_partitions_stop_the_run_in_one_line(tmp_path, server_identity):
    """3 nodes of num-partitions=3 and clients=20: one line naming both keys, not Flower's endless wait."""
    from types import SimpleNamespace

    from flwr.app import MessageType, MetricRecord, RecordDict

    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.flower.server_app import check_node_partitions
    from hyperfl_fast.flower.settings import settings_from_run_config


    class Grid:
        def __init__(self, nodes, partitions=None):
            self.nodes, self.partitions, self.asked = nodes, partitions or len(nodes), []

        def get_node_ids(self):
            return list(self.nodes)

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            self.asked += [m.metadata.message_type for m in messages]
            return [SimpleNamespace(has_error=lambda: False, metadata=replying(m.metadata.dst_node_id),
                                    content=RecordDict({"metrics": MetricRecord(
                                        {"partition-id": self.nodes.index(m.metadata.dst_node_id),
                                         "num-partitions": self.partitions})})) for m in messages]

    settings = settings_from_run_config({"dataset": "synthetic", "clients": 20, "output-dir": str(tmp_path)})
    few = Grid([11, 12, 13])
    with pytest.raises(ConfigError, match=r"^run config: clients=20, but SuperNode 11 holds partition 0 of "
                                          r"num-partitions=3; set clients=3 .*num-partitions=20$"):
        check_node_partitions(few, settings)
    assert few.asked == [MessageType.QUERY] * 3
    enough = Grid(list(range(100, 120)))  # every node a round needs is there: nothing to ask
    check_node_partitions(enough, settings)
    assert enough.asked == []
    fitting = Grid([11, 12], partitions=3)  # fewer than a round needs, but of the run's own split: go on waiting
    check_node_partitions(fitting, settings_from_run_config({"dataset": "synthetic", "clients": 3,
                                                             "output-dir": str(tmp_path)}))
    assert fitting.asked == [MessageType.QUERY] * 2


def test_a_restarted_node_restores_its_private_state_or_refuses_to_train(tmp_path):
    """Each round the node writes its private state (atomically, with a digest) under its state-dir; a restarted
    node (empty Context.state) reads it back; if it is gone while the server has aggregated from that partition
    before, the node refuses in one line unless fresh-start=true; a node that trained a round the server did not
    aggregate goes back to the state before it; a damaged file is refused too."""
    from flwr.app import Context, RecordDict

    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.flower import client
    from hyperfl_fast.flower.server_app import initial_global_state

    run_config = {k.replace("_", "-"): v for k, v in {**SETTINGS, "clients": 2}.items()}
    node_config = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path)}

    def context(**extra):
        return Context(run_id=7, node_id=1, node_config={**node_config, **extra}, state=RecordDict(),
                       run_config=run_config)

    first = context()
    global_state = initial_global_state(client.client_of(first)[0].cfg)
    client.client_round(first, global_state, 1)
    path = tmp_path / "run-7" / "partition-1.pt"
    assert path.exists() and client.state_file(first) == path

    restarted = context()
    client.restore_private(restarted, 1)
    assert client.rounds_trained(restarted) == 1
    want, got = first.state["private"].to_torch_state_dict(), restarted.state["private"].to_torch_state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert client.client_round(restarted, global_state, 2)[1]["rounds-before"] == 1

    # the server aggregated only 1 round from it (round 2's reply was lost): back to its state after round 1,
    # from Context.state's node as from a restarted one
    for node in (restarted, context()):
        with pytest.warns(UserWarning, match="trained 2 rounds, of which the server aggregated 1: it goes on from"):
            client.restore_private(node, 1)
        assert client.rounds_trained(node) == 1
        got = node.state["private"].to_torch_state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # trained round 2 again, and that reply lost too: round 1's state is still there to go back to
    client.client_round(node, global_state, 2)
    with pytest.warns(UserWarning, match="of which the server aggregated 1"):
        client.restore_private(context(), 1)

    path.unlink()
    with pytest.raises(ConfigError, match=r"^node state: partition 1 of run 7 trained 2 rounds before, but its "
                                          r"private state after them is not in .*fresh-start=true$"):
        client.restore_private(context(), 2)
    with pytest.warns(UserWarning, match="of which the server aggregated 0"):
        client.restore_private(context(), 0)  # never aggregated from: the seeded start is its state
    with pytest.warns(UserWarning, match="starts afresh"):
        client.restore_private(context(**{"fresh-start": True}), 2)

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="partition-1.pt"):
        client.restore_private(context(), 2)


def test_the_readmes_connection_block_works_in_a_clean_home_and_after_flwr_has_run(tmp_path):
    """The README's ~/.flwr/config.toml lines, run verbatim (twice), leave a file flwr reads, with the connection
    the README's `flwr run` line names, whether or not flwr had written its own configuration before."""
    readme = (REPO / "README.md").read_text()
    block = next(b.split("\n", 1)[1] for b in readme.split("```bash")[1:] if "[superlink.hyperfl-local]" in b)
    block = block.split("```")[0]
    assert "flwr run . hyperfl-local" in readme
    for name, flwr_ran_before in (("clean", False), ("used", True)):
        env = {**os.environ, "HOME": str(tmp_path / name), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("FLWR_HOME", None)
        (tmp_path / name).mkdir()
        if flwr_ran_before:  # flwr writes [superlink] default = "local" and [superlink.local] itself
            subprocess.run([str(BIN / "flwr"), "ls"], env=env, capture_output=True, timeout=120)
            assert "[superlink.local]" in (tmp_path / name / ".flwr" / "config.toml").read_text()
        for _ in range(2):
            subprocess.run(["bash", "-c", block], env=env, check=True, timeout=60)
        config = (tmp_path / name / ".flwr" / "config.toml").read_text()
        assert config.count("[superlink.hyperfl-local]") == 1
        out = subprocess.run([str(BIN / "flwr"), "ls", "hyperfl-local"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert "Connection to the SuperLink is unavailable" in out.stdout + out.stderr, out.stdout + out.stderr


def test_the_clientapp_module_loads_torch_only_for_messages_that_train():
    """Flower imports the ClientApp module in a fresh process per message: the SecAgg+ key exchanges and the
    partition query must not pay for torch (about 3 s on the 2-core box)."""
    code = "import sys, hyperfl_fast.flower.client_app; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['numpy']"


def test_the_servers_grid_pulls_replies_until_all_arrive_or_the_timeout():
    """PromptGrid: push once, pull every interval until every message is answered; a timeout returns what came."""
    from types import SimpleNamespace

    from hyperfl_fast.flower.server_app import PromptGrid

    class Grid:
        def __init__(self, answered_after):
            self.answered_after, self.pulls, self.pushed = answered_after, 0, []

        def push_messages(self, messages):
            self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
            return list(self.pushed)

        def pull_messages(self, ids):
            self.pulls += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                    if self.pulls >= self.answered_after[i]]

        def get_node_ids(self):
            return [1, 2]

    grid = Grid({"m0": 1, "m1": 3})
    replies = PromptGrid(grid, interval=0.01).send_and_receive(["a", "b"], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"] and grid.pulls == 3
    late = Grid({"m0": 1, "m1": 10 ** 9})
    replies = PromptGrid(late, interval=0.01).send_and_receive(["a", "b"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert PromptGrid(grid).get_node_ids() == [1, 2]  # the rest is the wrapped grid's


def test_bad_run_config_is_one_line():
    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.flower.settings import settings_from_run_config

    with pytest.raises(ConfigError, match="run config: unknown key 'learning-rate'"):
        settings_from_run_config({"learning-rate": 0.1})
    with pytest.raises(ConfigError, match="^run config: lr must be a finite number"):
        settings_from_run_config({"lr": -1.0})
    with pytest.raises(ConfigError, match="min-clients must be an integer in"):
        settings_from_run_config({"clients": 3, "min-clients": 5})


def test_pyproject_run_config_has_the_cli_defaults():
    import tomllib

    from hyperfl_fast.flower.settings import settings_from_run_config

    run_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = settings_from_run_config(run_config)
    assert settings.cfg == Config(output_dir=None)  # every default as the training CLI's
    in_process_only = {"engine", "output-dir", "cuda-graphs", "dispatch", "ops-path"}
    assert set(run_config) >= {f.replace("_", "-") for f in Config.field_names()} - in_process_only


@pytest.mark.parametrize("method", ["hyperfl", "dp-fedavg", "ppsgd", "pfedhn-pc", "hyperfl-lpm"])
def test_client_code_over_flower_records_equals_the_reference(method, tmp_path):
    """Every method's ClientApp code, driven in-process through Flower's records and its FedAvg aggregation,
    gives the reference engine's run; uploads hold exactly the method's shared part; private state persists."""
    from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from hyperfl_fast.flower.client import client_evaluation, client_round
    from hyperfl_fast.flower.server_app import initial_global_state
    from hyperfl_fast.flower.settings import settings_from_run_config

    backbone = {"backbone": "vit-tiny"} if method == "hyperfl-lpm" else {}  # (a 2-block ViT at 32x32)
    run_cfg = {k.replace("_", "-"): v for k, v in {**SETTINGS, "method": method, "epsilon": 50.0,
                                                   "dp_noise": "keyed", **backbone}.items()}  # (the reference's noise)
    cfg = settings_from_run_config(run_cfg).cfg
    shared = initial_global_state(cfg)
    contexts = [Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": 3},
                        state=RecordDict(), run_config=run_cfg) for i in range(3)]
    engine, _ = prepare(dataclasses.replace(cfg, engine="reference"), log=lambda _: None)
    method_ = get_method(cfg.method)
    spec = engine.spec
    for round_idx in range(2):
        sent, replies = [], []
        for i, context in enumerate(contexts):  # the global state, or (pfedhn) each its own
            sent.append(method_.send(spec, shared, i))
            replies.append(client_round(context, sent[i], round_idx + 1))
            if method_.steps_per_client:  # pFedHN's loop: the server steps before the next client receives
                shared = method_.aggregate(shared, [replies[i][0]], [replies[i][1]["num-examples"]], [i])
        expected = engine.run_round(round_idx, [0, 1, 2])
        for (upload, metrics), want, received in zip(replies, expected, sent):
            assert set(upload) == set(received)  # HyperFL: the hypernetwork; local: nothing; pfedhn: delta theta
            assert metrics["rounds-before"] == round_idx
            assert metrics["train-loss"] == pytest.approx(want.train_loss, rel=1e-4)
            assert metrics.get("epsilon") == (pytest.approx(want.epsilon) if method_.dp else None)
        if shared and not method_.steps_per_client:  # (pfedhn: stepped on as each reply arrived)
            records = [RecordDict({"arrays": ArrayRecord(up), "metrics": MetricRecord(m)}) for up, m in replies]
            shared = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
        accs = [client_evaluation(context, method_.send(spec, shared, i))["global-acc"]
                for i, context in enumerate(contexts)]
        assert accs == pytest.approx([r.global_acc for r in expected], abs=2.5)  # one test image in 40
    assert_equal_states(shared, engine.global_state())
    for i, context in enumerate(contexts):
        assert_equal_states(context.state["private"].to_torch_state_dict(), engine.client_state(i))


def test_the_server_sends_each_node_what_was_generated_for_its_partition(tmp_path, server_identity, monkeypatch):
    """pFedHN over Flower: the strategy asks each node its partition once; then the nodes train one after the
    other, in partition order, each train message carrying only that partition's weights, generated from the
    state the previous upload's step left; an upload is checked before the server steps on it; evaluate messages
    carry each partition's weights from the round's final state."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

    from hyperfl_fast.flower.server_app import UploadAuditingFedAvg, initial_global_state
    from hyperfl_fast.flower.settings import settings_from_run_config
    from hyperfl_fast.models import cnn_spec

    settings = settings_from_run_config({**{k.replace("_", "-"): v for k, v in SETTINGS.items()},
                                         "method": "pfedhn", "output-dir": str(tmp_path), "client-metrics": True})
    method, spec = get_method("pfedhn"), cnn_spec(1, 10)
    shared = initial_global_state(settings.cfg)
    layout = {k: tuple(t.shape) for k, t in method.send(spec, shared, 0).items()}
    keys = set(layout)
    hooked = []  # (partition, upload, what it was sent) as the upload hook sees them
    strategy = UploadAuditingFedAvg(settings, layout, method=method,
                                    on_upload=lambda _, pid, upload, received: hooked.append((pid, upload, received)))
    partition_of = {101: 2, 102: 0, 103: 1}
    torch.manual_seed(0)
    uploads = {pid: {k: 0.01 * torch.randn_like(t) for k, t in method.send(spec, shared, pid).items()}
               for pid in range(3)}
    asked, trained = [], []  # the nodes queried; (node, arrays) of each train message, in the order sent
    claims = dict(partition_of)  # the partition a node's train reply says it holds

    class Grid:
        def get_node_ids(self):
            return list(partition_of)

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages[0].metadata.message_type == MessageType.QUERY:
                asked.extend(m.metadata.dst_node_id for m in messages)
                return [SimpleNamespace(has_error=lambda: False, metadata=replying(m.metadata.dst_node_id),
                                        content=RecordDict({"metrics": MetricRecord(
                                            {"partition-id": partition_of[m.metadata.dst_node_id]})}))
                        for m in messages]
            assert len(messages) == 1 and messages[0].metadata.message_type == MessageType.TRAIN  # one at a time
            node = messages[0].metadata.dst_node_id
            trained.append((node, messages[0].content["arrays"].to_torch_state_dict()))
            assert messages[0].content["config"]["server-round"] == 1
            return [SimpleNamespace(has_error=lambda: False, metadata=replying(node), content=RecordDict({
                "arrays": ArrayRecord(uploads[partition_of[node]]),
                "metrics": MetricRecord({"num-examples": 60, "partition-id": claims[node], "train-loss": 1.0,
                                         "local-acc": 50.0})}))]

    generated = []  # the partitions the server generated weights for

    class Counted:  # the method, counting its generations
        def __getattr__(self, name):
            return getattr(method, name)

        def send(self, spec_, state, pid):
            generated.append(pid)
            return method.send(spec_, state, pid)

    monkeypatch.setattr(strategy, "method", Counted())
    assert list(strategy.configure_train(1, ArrayRecord(shared), ConfigRecord({}), Grid())) == []
    assert generated == [0, 1, 2]  # once per node, from the state the previous step left
    monkeypatch.setattr(strategy, "method", method)
    assert sorted(asked) == sorted(partition_of)
    assert [node for node, _ in trained] == [102, 103, 101]  # partitions 0, 1, 2
    want = shared
    for pid, (_, got) in enumerate(trained):
        assert set(got) == keys and "embeddings" not in got  # the hypernetwork and embeddings stay on the server
        assert_equal_states(got, method.send(spec, want, pid))  # generated after the previous client's step
        assert hooked[pid][0] == pid and hooked[pid][1] is not None
        assert_equal_states(hooked[pid][1], uploads[pid])
        assert_equal_states(hooked[pid][2], got)  # the hook sees what this node was sent
        want = method.aggregate(want, [uploads[pid]], [60], [pid])
    arrays, _ = strategy.aggregate_train(1, [])
    assert_equal_states(arrays.to_torch_state_dict(), want)

    liar = UploadAuditingFedAvg(settings, layout, method=method)
    claims[101] = 1  # node 101 holds partition 2
    liar.min_train_nodes = 1
    trained.clear()
    liar.configure_train(1, ArrayRecord(shared), ConfigRecord({}), Grid())
    assert any("replied as partition 1, not the 2 it was sent; refused" in line for line in liar.failed)
    honest = method.aggregate(method.aggregate(shared, [uploads[0]], [60], [0]), [uploads[1]], [60], [1])
    assert_equal_states(liar.aggregate_train(1, [])[0].to_torch_state_dict(), honest)  # not stepped on
    asked.clear()
    evaluate = list(strategy.configure_evaluate(settings.cfg.rounds, arrays, ConfigRecord({}), Grid()))
    assert not asked and {m.metadata.message_type for m in evaluate} == {MessageType.EVALUATE}  # asked once
    for msg in evaluate:
        pid = partition_of[msg.metadata.dst_node_id]
        assert_equal_states(msg.content["arrays"].to_torch_state_dict(),
                            method.send(spec, arrays.to_torch_state_dict(), pid))
