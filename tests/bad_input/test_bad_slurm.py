"""hpcdyn slurm: no value of any option becomes code in a generated script.

A fuzz of option values (quotes, $(), backticks, newlines, spaces) is either refused with the field
named, or rendered into a script that passes ``bash -n`` and, run by bash with stand-ins for ray,
hpcdyn and the driver, executes none of its metacharacters: the driver receives them as data. The
per-job Ray directories are private (mktemp, mode 700, ours), stale ones of an earlier run of the
job are removed, and a root every user may write to without the sticky bit is refused.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from hpcdyn.distributed.slurm import ARRAY_JOB_TEMPLATE  # noqa: F401  (the template these tests run)

from .common import assert_refused, listing, run_cli

REPOSITORY = Path(__file__).resolve().parents[2]
STUBS = {
    # the Ray head: records where it was told to put its files, then runs until stopped
    "ray": """#!/bin/bash
for arg in "$@"; do
    case "$arg" in --temp-dir=*) dir=${arg#*=} ;; --object-spilling-directory=*) spill=${arg#*=} ;; esac
done
stat -c '%a %u' "$dir" "$spill" > "$RECORD/modes"; printf '%s\\n%s\\n' "$dir" "$spill" > "$RECORD/dirs"
exec sleep 60
""",
    # the helpers the script calls, and `hpcdyn simulate` of the array script (records its arguments)
    "hpcdyn": """#!/bin/bash
case "$1 $2" in
    "slurm port-block") echo 20000 ;;
    "slurm wait-for-nodes")  # like the real one: until the head is up
        for _ in $(seq 1 200); do [ -s "$RECORD/dirs" ] && exit 0; sleep 0.05; done; exit 1 ;;
    *) printf '%s\\0' "$@" > "$RECORD/hpcdyn" ;;
esac
""",
    # a driver that records its arguments and environment
    "record-args": """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD/driver"; printf '%s' "$RAY_ADDRESS" > "$RECORD/ray_address"
""",
}


@pytest.fixture()
def harness(tmp_path):
    """(environment, record directory, marker): stand-ins on PATH; the marker must never appear."""
    stubs, record = tmp_path / "stubs", tmp_path / "record"
    stubs.mkdir()
    record.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    environment = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RECORD": str(record),
        "HPCDYN_RAY_HEAD_IP": "127.0.0.1",
        "SLURM_JOB_NODELIST": "node1",
    }
    return environment, record, tmp_path / "PWNED"


def payloads(marker: Path) -> list[str]:
    return [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"'; touch {marker}; '",
        f'"; touch {marker}; "',
        f"x\ntouch {marker}",
        f"a b  c; touch {marker}",
        f"${{IFS}}touch${{IFS}}{marker}",
        "}",
    ]


OPTIONS = {  # option -> (how a payload is given, the field a refusal names)
    "--job-name": (lambda p: p, "job_name:"),
    "--partition": (lambda p: p, "partition:"),
    "--account": (lambda p: p, "account:"),
    "--mem": (lambda p: "4G" + p, "memory:"),
    "--time": (lambda p: "10" + p, "time:"),
    "--log": (lambda p: "/logs/" + p, "output:"),
    "--sbatch": (lambda p: "--comment=" + p, "sbatch_options:"),
    "--ray-tmp-root": (lambda p: "/tmp/" + p, "tmp_root:"),
}


def _run_prefix(script: Path, environment: dict) -> subprocess.CompletedProcess:
    """Run a rendered ray script up to where it needs SLURM: settings, setup, driver, checks."""
    return subprocess.run(["bash", str(script)], env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_fuzzed_option_values_are_refused_or_inert(tmp_path, capsys, harness, option):
    environment, _, marker = harness
    give, field = OPTIONS[option]
    for index, payload in enumerate(payloads(marker)):
        script = tmp_path / f"job-{index}.sbatch"
        outcome = run_cli(["slurm", "ray", f"{option}={give(payload)}", "--out", script, "--", "record-args"], capsys)
        if outcome.code != 0:
            assert_refused(outcome, field)
            assert not script.exists()
            continue
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        _run_prefix(script, environment)
    assert not marker.exists(), "a metacharacter of an option value was executed"


def test_the_injection_of_the_issue_is_refused(tmp_path, capsys):
    marker = tmp_path / "x"
    outcome = run_cli(["slurm", "ray", "--ray-tmp-root", f"/tmp/$(touch {marker})", "--out", tmp_path / "j.sbatch"], capsys)
    assert_refused(outcome, "tmp_root:")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("line", ["echo 'unterminated", 'echo "unterminated', "if true; then", "echo $(", "fi"])
def test_setup_lines_that_do_not_parse_are_refused(tmp_path, capsys, line):
    outcome = run_cli(["slurm", "ray", "--setup", line, "--out", tmp_path / "j.sbatch"], capsys)
    assert_refused(outcome, "setup:")
    assert listing(tmp_path) == []
    array = ["slurm", "array", "--density", "0.3", "--replicas", "1", "--t-final", "1", "--snapshot-every", "1",
             "--out-dir", tmp_path / "o", "--setup", line]  # fmt: skip
    assert_refused(run_cli(array, capsys), "setup:")


def test_driver_arguments_reach_the_driver_as_data(tmp_path, capsys, harness):
    """The whole job, run by bash with stand-ins: metacharacters in the driver's arguments arrive verbatim."""
    environment, record, marker = harness
    arguments = payloads(marker)
    script = tmp_path / "job.sbatch"
    assert run_cli(["slurm", "ray", "--out", script, "--", "record-args", *arguments], capsys).code == 0
    root = tmp_path / "ray-root"
    root.mkdir(mode=0o755)
    stale = root / "hpcdyn-ray-4242-0.OLDRUN"  # an earlier run of this job, killed before its cleanup
    stale.mkdir()
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         env={**environment, "SLURM_JOB_ID": "4242", "HPCDYN_RAY_TMP_ROOT": str(root),
                              "HPCDYN_RAY_SPILL_ROOT": str(root), "HPCDYN_RAY_AUTH_MODE": "disabled"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    received = (record / "driver").read_text().split("\0")[:-1]
    assert received == [*arguments, "--address", "127.0.0.1:20000"]
    assert (record / "ray_address").read_text() == "127.0.0.1:20000"
    assert not marker.exists()
    temp_dir, spill_dir = (record / "dirs").read_text().split()
    assert Path(temp_dir).name.startswith("hpcdyn-ray-4242-0.") and Path(temp_dir).parent == root
    assert Path(spill_dir).name.startswith("hpcdyn-ray-spill-4242-0.")
    assert Path(temp_dir).name != "hpcdyn-ray-4242-0.OLDRUN"
    uid = str(os.getuid())
    assert (record / "modes").read_text().split() == ["700", uid, "700", uid]  # private, ours
    assert list(root.iterdir()) == []  # the stale dir of the earlier run and this run's dirs are gone


def test_a_root_every_user_can_write_without_the_sticky_bit_is_refused(tmp_path, capsys, harness):
    environment, record, _ = harness
    script = tmp_path / "job.sbatch"
    assert run_cli(["slurm", "ray", "--out", script, "--", "record-args"], capsys).code == 0
    root = tmp_path / "open-root"
    root.mkdir()
    root.chmod(0o777)  # anyone could swap a directory in there
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                         env={**environment, "SLURM_JOB_ID": "4243", "HPCDYN_RAY_TMP_ROOT": str(root)})  # fmt: skip
    assert run.returncode != 0 and "writable by every user and not sticky" in run.stderr
    assert not (record / "driver").exists() and list(root.iterdir()) == []
    root.chmod(0o777 | stat.S_ISVTX)  # /tmp's mode: sticky, so fine


def test_array_values_reach_simulate_as_data(tmp_path, capsys, harness):
    environment, record, marker = harness
    out_dir = tmp_path / f"o $(touch {marker}) `touch {marker}` ' \""
    script = tmp_path / "array.sbatch"
    outcome = run_cli(["slurm", "array", "--density", "0.1", "0.3", "--replicas", "2", "--t-final", "1", "--snapshot-every",
                       "1", "--seed", "5", "--out-dir", out_dir, "--out", script], capsys)  # fmt: skip
    assert outcome.code == 0, outcome.err
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                         env={**environment, "SLURM_ARRAY_TASK_ID": "3"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    received = (record / "hpcdyn").read_text().split("\0")[:-1]
    assert received[:2] == ["simulate", "--system"] and received[-2:] == ["--out", f"{out_dir}/density-0.3/replica-0001.zarr"]
    assert received[received.index("--seed") + 1] == "8"
    assert not marker.exists()


@pytest.mark.parametrize("arguments, field", [
    (["--preset", "paper; touch /tmp/x"], "preset:"),
    (["--seed", "-1"], "seed:"),
    (["--replicas", "0"], "replicas:"),
    (["--density", "nan"], "density:"),
])  # fmt: skip
def test_array_options(tmp_path, capsys, arguments, field):
    base = ["slurm", "array", "--density", "0.3", "--replicas", "1", "--t-final", "1", "--snapshot-every", "1",
            "--out-dir", tmp_path / "o", "--out", tmp_path / "a.sbatch"]  # fmt: skip
    assert_refused(run_cli([*base, *arguments], capsys), field)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("arguments, field", [
    (["port-block", "--job-id", "-5"], "--job-id"),
    (["wait-for-nodes", "--address", "127.0.0.1:1", "--nodes", "1", "--timeout", "nan"], "--timeout"),
    (["ray", "--node-timeout", "5"], "node_timeout:"),
    (["ray", "--stop-grace", "0"], "stop_grace:"),
    (["ray", "--out", "/proc/version/x.sbatch"], "out:"),
])  # fmt: skip
def test_helper_and_setting_options(capsys, arguments, field):
    assert_refused(run_cli(["slurm", *arguments], capsys), field)


def test_example_script_runs_end_to_end_with_private_directories(tmp_path, harness):
    """slurm/ray.sbatch itself (driver as arguments), run as sbatch would run it."""
    environment, record, marker = harness
    root = tmp_path / "root"
    run = subprocess.run(["bash", str(REPOSITORY / "slurm" / "ray.sbatch"), "record-args", f"$(touch {marker})"],
                         capture_output=True, text=True, timeout=120,
                         env={**environment, "SLURM_JOB_ID": "77", "HPCDYN_RAY_TMP_ROOT": str(root),
                              "HPCDYN_RAY_SPILL_ROOT": str(root)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (record / "driver").read_text().split("\0")[:-1] == [f"$(touch {marker})", "--address", "127.0.0.1:20000"]
    assert not marker.exists() and list(root.iterdir()) == []
