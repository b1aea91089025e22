"""The declared method contract: what a method is lives in its class, so adding a method is adding one module.

A toy method (a second name for FedAvg that keeps nothing else) is registered the way a new module's class
would be, and every command line, engine and table then knows it, with no other file touched.
"""
import pytest

from hyperfl_fast.config import Config, ConfigError
from hyperfl_fast.engines import Engine
from hyperfl_fast.methods import ATTACK, METHODS, POISSON, Method, get_method, method_names
from hyperfl_fast.methods.base import REGISTRY, register
from hyperfl_fast.methods.fedavg import FedAvg


@pytest.fixture
def toy_method():
    @register
    class Toy(FedAvg):
        """FedAvg under another name and Table 1 row: a stand-in for a new method module."""

        name = "toy"
        paper_row = 99
        supports = frozenset({ATTACK})
        paper = {"fmnist": {20: 42.0}}

    yield Toy
    del REGISTRY["toy"]


def test_every_method_declares_what_it_is():
    assert list(METHODS) == ["local", "fedavg", "pfedhn", "pfedhn-pc", "dp-fedavg", "centaur", "ppsgd",
                             "hyperfl", "hyperfl-lpm"]  # Table 1's order (pFedHN-PC beside pFedHN), then Table 2's
    assert [n for n, m in METHODS.items() if m.needs_backbone] == ["hyperfl-lpm"]
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert issubclass(method.lockstep, Engine)
        assert method.headline in ("local_acc", "global_acc") and isinstance(method.uploads, str)
    assert method_names(POISSON) == ["dp-fedavg", "centaur", "ppsgd"] == [n for n, m in METHODS.items() if m.dp]
    assert method_names(ATTACK) == ["fedavg", "pfedhn", "pfedhn-pc", "dp-fedavg", "centaur", "ppsgd",
                                    "hyperfl", "hyperfl-lpm"]  # local uploads nothing
    assert [n for n, m in METHODS.items() if m.sends_per_client] == ["pfedhn", "pfedhn-pc"]


def test_a_declaration_that_is_incomplete_or_inconsistent_is_refused():
    with pytest.raises(TypeError, match="does not declare 'paper_row'"):
        register(type("NoRow", (Method,), {"name": "no-row", "headline": "local_acc", "uploads": "", "keeps": "",
                                           "lockstep": Engine}))
    with pytest.raises(TypeError, match="names its threat model"):
        @register
        class NoThreat(FedAvg):
            name, paper_row, threat = "no-threat", 98, None
    with pytest.raises(TypeError, match="paper maps dataset -> clients -> figure"):
        @register
        class FlatPaper(FedAvg):
            name, paper_row, paper = "flat-paper", 97, {"fmnist": 42.0}
    with pytest.raises(TypeError, match="two methods are called 'fedavg'"):
        register(type("Again", (FedAvg,), {}))
    assert "no-threat" not in REGISTRY and "flat-paper" not in REGISTRY


def test_a_new_method_module_is_all_it_takes(toy_method, tmp_path, capsys):
    from hyperfl_fast import attack, reproduce, train

    assert get_method("toy").paper == {"fmnist": {20: 42.0}} and list(METHODS)[-1] == "toy"
    Config(method="toy", device="cpu").validate()
    with pytest.raises(ConfigError, match="--poisson samples DP-SGD batches: it applies to dp-fedavg"):
        Config(method="toy", poisson=True, device="cpu").validate()
    flags = ["--dataset", "synthetic", "--method", "toy", "--clients", "2", "--local-size", "20", "--test-size",
             "10", "--local-epochs", "1", "--batch-size", "10", "--rounds", "1", "--device", "cpu"]
    for engine in ("batched", "reference"):
        assert train.main(flags + ["--engine", engine, "--output-dir", str(tmp_path / engine)]) == 0
    assert "done: toy on synthetic" in capsys.readouterr().out
    assert "toy" in attack.build_parser().parse_args(["--method", "toy"]).method
    assert "toy" in reproduce.build_parser().parse_args([]).methods.split(",")
    assert "hyperfl-lpm" not in reproduce.build_parser().parse_args([]).methods.split(",")


def test_unknown_methods_name_the_choices():
    with pytest.raises(ValueError, match="unknown method 'fedsgd'; choose one of local, fedavg, pfedhn, pfedhn-pc, "
                                         "dp-fedavg"):
        get_method("fedsgd")
    with pytest.raises(ConfigError, match="--method: unknown method 'fedsgd'"):
        Config(method="fedsgd", device="cpu").validate()


def test_engines_share_one_contract():
    import inspect

    from hyperfl_fast.reference import ReferenceEngine

    engines = {ReferenceEngine, *(m.lockstep for m in METHODS.values())}
    for engine in engines:
        assert issubclass(engine, Engine) and not inspect.isabstract(engine), engine
        for name in ("run_round", "global_state", "client_state", "load_states"):
            assert getattr(engine, name) is not getattr(Engine, name), f"{engine.__name__} lacks {name}"
    assert {e.progress_unit for e in engines} == {"client", "epoch"}
