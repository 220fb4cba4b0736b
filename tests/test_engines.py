"""Which engine an ensemble runs a learned model on: the table for a hard-local model (any lattice
size), the network otherwise; a forced table is warned about and recorded; the store says which."""

import json
import warnings

import numpy as np
import pytest
import torch
import zarr

from hpcdyn.distributed.engines import choose_engine
from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble
from hpcdyn.learning.transformer import TransformerConfig
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.storage.ensemble_store import MANIFEST, stored_config
from tests.test_locality import save_run

SYSTEM = make_system("active", {"L": 8, "N": 8, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})


def hard_local(mode=2):
    return TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=1, d_ff=16, mode=mode, n_classes=3,
                             attention_stencil="vn1", rotary=False)  # fmt: skip


def unrestricted():
    return TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=1, d_ff=16)


def ensemble(run, out, engine="auto", L=None, t_final=2.0):
    config = EnsembleConfig(models=("original", str(run)), densities=(0.125, 0.25), replicas=2, t_final=t_final,
                            snapshot_every=0.5, seed=3, L=L, D=0.3, v_plus=4.0, v_other=0.8, engine=engine)  # fmt: skip
    return run_ensemble(config, out, Placement(in_process=True))


def manifest_entries(store):
    return [json.loads(path.read_text()) for path in sorted((store / MANIFEST / "done").glob("*.json"))]


def test_a_hard_local_model_runs_on_its_table_at_its_training_size_and_at_another(tmp_path):
    torch.manual_seed(0)  # the model's initial weights, so the audited lookups are the same every run
    run = save_run(tmp_path / "run", hard_local(), SYSTEM)
    for L in (8, 12):
        out = tmp_path / f"ensemble-{L}.zarr"
        summary = ensemble(run, out, L=L, t_final=10.0)  # long enough for about 10 audited lookups (1 in 1000)
        assert summary["engines"] == {"original": "compiled", "run": "table"}
        learned = stored_config(out)["models"][1]
        assert learned["engine"] == "table" and learned["key_family"] == "vn1" and "hard-local" in learned["reason"]
        occupancy = zarr.open_group(str(out), mode="r")["occupancy"][1]
        assert occupancy.shape[-2:] == (L, L)
        particles = (occupancy > 0).sum(axis=(-1, -2))  # rejected overlaps: particles are conserved
        assert np.array_equal(particles[0], np.full(particles.shape[1:], round(0.125 * L * L)))
        tables = [entry["table"] for entry in manifest_entries(out) if "table" in entry]
        assert tables, "the table engine's statistics are in the manifest"
        audits = [table["audit_largest_difference"] for table in tables if table["audit_largest_difference"] is not None]
        if L == 8:  # at the training size the audit re-evaluates lookups in the full configuration
            assert audits and all(audit < 1e-5 for audit in audits)  # exact by construction: float32 rounding only
    assert (run / "table-vn1.zarr").exists()


def test_the_network_engine_is_used_when_asked_and_refuses_another_lattice_size(tmp_path):
    run = save_run(tmp_path / "run", hard_local(), SYSTEM)
    assert ensemble(run, tmp_path / "network.zarr", engine="network")["engines"]["run"] == "network"
    with pytest.raises(ConfigurationError, match="^L: .*runs only there.*network engine"):
        ensemble(run, tmp_path / "other.zarr", engine="network", L=12)


def test_an_unrestricted_model_without_certificate_runs_on_the_network_and_a_forced_table_is_recorded(tmp_path):
    run = save_run(tmp_path / "run", unrestricted(), SYSTEM)
    config = unrestricted()
    chosen = choose_engine("auto", config, run / "best.pt", "0" * 64)
    assert chosen["engine"] == "network" and "no locality certificate" in chosen["reason"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forced = choose_engine("table", config, run / "best.pt", "0" * 64)
    assert forced["engine"] == "table" and "although" in forced["reason"]
    assert any("engine:" in str(warning.message) for warning in caught)
    with pytest.raises(ConfigurationError, match="^engine: must be one of"):
        choose_engine("gpu", config, run / "best.pt", "0" * 64)


def certificate_passing_at(family, checkpoint_sha256, mode=2):
    """A certificate that passes at ``family`` (vn1's key space is smaller than diamond2's)."""
    from hpcdyn.learning.locality import Certificate, FamilyResult

    spaces = {"vn1": 2_500, "diamond2": 4 * 5**12}
    rows = tuple(FamilyResult(name, space, name == family or name == "diamond2", ()) for name, space in spaces.items())
    return Certificate("best.pt", checkpoint_sha256, mode, "class_disagreement", 1e-4, "diamond2", rows, family)


def write_certificate_json(certificate, directory):
    from hpcdyn.learning.locality import CERTIFICATE_FILE
    from hpcdyn.storage.strict_json import dumps

    (directory / CERTIFICATE_FILE).write_text(dumps(certificate.as_dict()))


def test_a_hard_local_model_takes_a_smaller_family_that_its_certificate_passes(tmp_path):
    config = TransformerConfig(lattice_size=8, d_model=16, n_heads=4, n_layers=2, d_ff=16, mode=2, n_classes=3,
                               attention_stencil="vn1", rotary=False)  # fmt: skip
    assert config.key_family == "diamond2"
    exact = choose_engine("auto", config, tmp_path / "best.pt", "a" * 64)  # no certificate: the receptive family
    assert exact["key_family"] == "diamond2" and "exactly" in exact["reason"]
    write_certificate_json(certificate_passing_at("vn1", "a" * 64), tmp_path)
    smaller = choose_engine("auto", config, tmp_path / "best.pt", "a" * 64)
    assert smaller["engine"] == "table" and smaller["key_family"] == "vn1" and "passes at vn1" in smaller["reason"]
    assert choose_engine("auto", config, tmp_path / "best.pt", "b" * 64)["key_family"] == "diamond2"  # another checkpoint's
    write_certificate_json(certificate_passing_at("diamond2", "a" * 64), tmp_path)
    assert choose_engine("auto", config, tmp_path / "best.pt", "a" * 64)["key_family"] == "diamond2"


def test_a_table_family_can_be_asked_for_with_the_table_engine_only(tmp_path):
    run = save_run(tmp_path / "run", unrestricted(), SYSTEM)
    config, checkpoint = unrestricted(), run / "best.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = choose_engine("table", config, checkpoint, "0" * 64, "block3")
    assert (asked["engine"], asked["key_family"]) == ("table", "block3") and "--table-family block3" in asked["reason"]
    assert "no locality certificate" in asked["reason"] and any("engine:" in str(warning.message) for warning in caught)
    with pytest.raises(ConfigurationError, match="^table_family: .*--engine table"):
        choose_engine("auto", config, checkpoint, "0" * 64, "block3")
    with pytest.raises(ConfigurationError, match="^key family: must be one of"):
        choose_engine("table", config, checkpoint, "0" * 64, "block4")
    with pytest.raises(ConfigurationError, match="^table_family: .*--engine table"):
        EnsembleConfig(models=(str(run),), densities=(0.125,), replicas=1, t_final=1.0, snapshot_every=0.5, table_family="vn1")
    # the family the certificate passes is named as passing, its figures recorded
    from hpcdyn.learning.locality import file_sha256

    sha = file_sha256(checkpoint)
    write_certificate_json(certificate_passing_at("vn1", sha), run)
    certified = choose_engine("table", config, checkpoint, sha, "vn1")
    assert "its locality certificate passes there" in certified["reason"] and "certificate" in certified
