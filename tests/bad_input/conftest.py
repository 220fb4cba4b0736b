"""Small real products to damage: a trajectory store, a checkpoint and an ensemble store (made once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcdyn.physics.systems import make_system

SYSTEM = make_system("active", {"L": 6, "N": 4})


@pytest.fixture(scope="session")
def trajectory_template(tmp_path_factory) -> Path:
    from hpcdyn.simulation.drivers import simulate_to_store

    out = tmp_path_factory.mktemp("template") / "run.zarr"
    return simulate_to_store(SYSTEM, 20.0, seed=1, out=out, snapshot_every=1.0, chunk_events=256)


@pytest.fixture()
def store(tmp_path, trajectory_template) -> Path:
    """A fresh copy of the template store, to damage."""
    return Path(shutil.copytree(trajectory_template, tmp_path / "run.zarr"))


def tiny_checkpoint_state(store_path: Path) -> dict:
    from hpcdyn.learning.checkpoint import FORMAT, store_identity
    from hpcdyn.learning.training import TrainingConfig
    from hpcdyn.learning.transformer import TransformerConfig, TransformerRates
    from hpcdyn.storage.trajectory_store import open_trajectory

    model = TransformerRates(TransformerConfig(system="active", lattice_size=6, d_model=8, n_heads=1, n_layers=1, d_ff=8))
    return {
        "format": FORMAT,
        "model_config": model.config.as_dict(),
        "model_state": model.state_dict(),
        "training_config": TrainingConfig(model=model.config).as_dict(),
        "metrics": [],
        "store": store_identity(open_trajectory(store_path)),
    }


@pytest.fixture(scope="session")
def run_template(tmp_path_factory, trajectory_template) -> Path:
    """A run directory with an (untrained) best.pt of a tiny model of the template's system."""
    from hpcdyn.learning.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    save_checkpoint(tiny_checkpoint_state(trajectory_template), run / "best.pt")
    return run


@pytest.fixture(scope="session")
def ensemble_template(tmp_path_factory) -> Path:
    from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble

    config = EnsembleConfig(models=("original",), densities=(0.2, 0.4), replicas=2, t_final=2.0, snapshot_every=0.5,
                            seed=1, L=8, replicas_per_unit=1)  # fmt: skip
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.zarr"
    run_ensemble(config, path, Placement(in_process=True))
    return path


@pytest.fixture()
def ensemble_store(tmp_path, ensemble_template) -> Path:
    return Path(shutil.copytree(ensemble_template, tmp_path / "ensemble.zarr"))
