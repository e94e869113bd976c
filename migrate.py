#!/usr/bin/env python3
"""migrate.py: the whole migration on one machine, in one command.

Starts master_mapper.py, python_zipper.py and python_unzipper.py together (each follows the
stage before it through the bucket), shows one progress display for the three, and when a
stage ends with 3 (partly done) or 4 (waiting for an earlier stage), runs the stages again from
that one, after a pause that doubles each round, up to MAX_ROUNDS rounds. It stops at 0 (the
migration is restored and verified) or when a person must act: 1 (a fatal error), 2 (invalid
configuration, or a SOURCE or DESTINATION that does not exist), 75 (DESTINATION paused for a
provider quota, waited out with WAIT_FOR_QUOTA=1; or another instance holds the lock). The
stages read the same variables as when they run one by one; every line they log is shown,
marked with the stage's name.

Usage: python migrate.py [--status [--html FILE] | --notify-failure UNIT]
  --status                 what python_unzipper.py --status shows: every stage, folder and worker
  --html FILE              with --status: also write that view as one self-contained HTML page
  --notify-failure UNIT    tell NOTIFY_URLS that systemd unit UNIT failed (the OnFailure= unit)

Example:
  SOURCE=onedrive:Work DESTINATION=gdrive:Work S3_BUCKET=my-hub python migrate.py
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from common_s3 import (EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_TEMPORARY, EXIT_USAGE,
                       EXIT_WAITING, SCRIPT_FILES, Config, ConfigError, HeartbeatRecord, Layout, MigrationError,
                       Notice, Notifier, Records, count, early_exit, env_bool, env_number, human_bytes, log,
                       log_event, make_s3_client, most_severe, near_misses, notify_scheme, parse_mtime,
                       setup_logging, split_notify_urls, variables_help)

STAGES = ("mapper", "zipper", "unzipper")
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = "migrate"
PERSON_MUST_ACT = (EXIT_FAILED, EXIT_USAGE)
LONGEST_PAUSE_S = 900.0
# A stage's own progress lines: the combined display says the same for the three.
_PROGRESS_LINE = re.compile(r"progress: \d+/\d+ units")


@dataclass(frozen=True)
class Settings:
    """The variables of this command; the stages read their own."""

    max_rounds: int
    backoff_s: float
    wait_for_quota: bool
    tick_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str], tty: bool) -> "Settings":
        interval = env_number(environ, "PROGRESS_INTERVAL", 30, minimum=1)
        return cls(max_rounds=int(env_number(environ, "MAX_ROUNDS", 5, minimum=1, maximum=1000, integer=True)),
                   backoff_s=env_number(environ, "RERUN_BACKOFF", 60, minimum=0, maximum=86400),
                   wait_for_quota=env_bool(environ, "WAIT_FOR_QUOTA"),
                   tick_s=2.0 if tty else interval)


# What to do after a round

@dataclass(frozen=True)
class Verdict:
    """After a round: ``done``, ``again`` (from ``stage``) or ``stop``, with the exit code."""

    action: str
    code: int
    stage: str | None = None
    why: str = ""


def judge(codes: Mapping[str, int], paused: bool) -> Verdict:
    """What a round's exit codes ask for. 1 and 2 need a person; 75 is a quota pause (``paused``)
    or another instance's lock; 3, 4, and a stage killed by a signal not ours, are run again
    from the first stage that did not finish."""
    if all(code == EXIT_OK for code in codes.values()):
        return Verdict("done", EXIT_OK)
    worst = most_severe(*(c for c in codes.values() if c >= 0))
    act = [s for s, c in codes.items() if c in PERSON_MUST_ACT]
    if act:
        return Verdict("stop", most_severe(*(codes[s] for s in act)), act[0],
                       "a person must act (the stage's lines above say what)")
    if any(c == EXIT_TEMPORARY for c in codes.values()):
        if paused:
            return Verdict("quota", EXIT_TEMPORARY, first_unfinished(codes), "DESTINATION is paused for a quota")
        return Verdict("stop", EXIT_TEMPORARY, None, "another instance holds a lock on WORK_DIR")
    return Verdict("again", worst if worst > 0 else EXIT_PARTIAL, first_unfinished(codes), "")


def first_unfinished(codes: Mapping[str, int]) -> str:
    return next(s for s in STAGES if codes.get(s, EXIT_OK) != EXIT_OK)


def pause_before(round_no: int, backoff_s: float) -> float:
    """The pause before round ``round_no`` (2, 3, ...): RERUN_BACKOFF, doubling, at most 15 min."""
    return min(LONGEST_PAUSE_S, backoff_s * 2 ** max(0, round_no - 2))


# The stages as child processes

class Stage:
    """One script as a child process in its own process group; its lines go to ``show``."""

    def __init__(self, script: str, env: Mapping[str, str], show: Callable[[str, str], None]):
        self.script = script
        self.proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, SCRIPT_FILES[script])],
                                     env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     process_group=0)
        self._reader = threading.Thread(target=self._read, args=(show,), daemon=True, name=f"read-{script}")
        self._reader.start()

    def _read(self, show: Callable[[str, str], None]) -> None:
        for line in self.proc.stdout:
            show(self.script, line.rstrip("\n"))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def code(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self._reader.join(5)  # every line it printed is shown before its end is told
        return code


class Display:
    """One display for the three stages: a bar each on a terminal (their log lines scroll above),
    else a line every PROGRESS_INTERVAL seconds."""

    def __init__(self, tty: bool, json_logs: bool):
        self.lock = threading.Lock()
        self.json_logs = json_logs
        self.bars: dict[str, Any] = {}
        if tty and not json_logs:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                width = shutil.get_terminal_size((100, 20)).columns
                for n, script in enumerate(STAGES):
                    self.bars[script] = tqdm(total=100, position=n, desc=f"{script:<8}", ncols=width, leave=False,
                                             bar_format="{desc} {bar:20}{postfix}", file=sys.stderr)

    def line(self, script: str, text: str) -> None:
        if _PROGRESS_LINE.search(text):
            return
        # A log line names its script already; a result line (a table row) is marked.
        named = self.json_logs or re.match(rf"\d\d:\d\d:\d\d \w+ +{script} ", text)
        shown = text if named else f"{script:<8} | {text}"
        with self.lock:
            if self.bars:
                next(iter(self.bars.values())).write(shown, file=sys.stderr)
            else:
                sys.stderr.write(shown + "\n")
                sys.stderr.flush()

    def say(self, level: str, text: str) -> None:
        """The command's own lines go through the log; above the bars on a terminal."""
        with self.lock:
            if not self.bars:
                getattr(log, level)("%s", text)
                return
            bar = next(iter(self.bars.values()))
            with type(bar).external_write_mode(file=sys.stderr):  # every bar cleared, then drawn again
                getattr(log, level)("%s", text)

    def update(self, beats: Mapping[str, HeartbeatRecord | None], ended: Mapping[str, int]) -> None:
        words = {s: describe(beats.get(s), ended.get(s)) for s in STAGES}
        if self.bars:
            with self.lock:
                for script, bar in self.bars.items():
                    bar.n = percent(beats.get(script), ended.get(script))
                    bar.set_postfix_str(words[script], refresh=False)
                    bar.refresh()
        else:
            self.say("info", "progress: " + "; ".join(f"{s} {words[s]}" for s in STAGES))

    def close(self) -> None:
        for bar in reversed(list(self.bars.values())):  # the lowest first: the cursor ends at the start of a line
            bar.close()
        self.bars = {}


def percent(beat: HeartbeatRecord | None, code: int | None) -> float:
    if code == EXIT_OK:
        return 100.0
    if beat is None:
        return 0.0
    if beat.bytes_total >= beat.bytes_done > 0:
        return 100.0 * beat.bytes_done / beat.bytes_total
    return min(100.0, 100.0 * beat.units_done / beat.units_total) if beat.units_total else 0.0


def describe(beat: HeartbeatRecord | None, code: int | None) -> str:
    """A stage's progress in a few words, from its heartbeat."""
    if code is not None:
        return "done" if code == EXIT_OK else f"ended with exit {code}"
    if beat is None:
        return "starting"
    # A stage that follows another learns its total as it goes.
    text = (f"{beat.units_done}/{beat.units_total} units" if beat.units_total >= beat.units_done
            else f"{beat.units_done} units done")
    if beat.bytes_total >= beat.bytes_done:
        text += f", {human_bytes(beat.bytes_done)} of {human_bytes(beat.bytes_total)}" if beat.bytes_total else ""
    else:
        text += f", {human_bytes(beat.bytes_done)}"
    if beat.bytes_per_s:
        text += f", {human_bytes(beat.bytes_per_s)}/s"
        left = max(0, beat.bytes_total - beat.bytes_done)
        eta = left / beat.bytes_per_s
        text += (f", ETA {eta:.0f} s" if eta < 90 else f", ETA {eta / 60:.0f} min") if left else ""
    if beat.units_failed:
        text += f", {beat.units_failed} failed"
    return text if beat.units_total or beat.units_done else "waiting for the stage before"


# One round

@dataclass
class Migration:
    """What every round shares: the environment of the stages, the bucket, the display."""

    cfg: Config
    env: dict
    records: Records
    layout: Layout
    settings: Settings
    display: Display
    signum: int | None = None
    rounds: int = 0
    notifier: Notifier = field(default_factory=Notifier)
    told: str = ""  # the line the command ended with, for NOTIFY_URLS
    seen: dict = field(default_factory=dict)  # each stage's last heartbeat
    started: float = field(default_factory=time.monotonic)

    def end(self, level: str, text: str, code: int) -> int:
        self.display.say(level, text)
        self.told = text
        return code

    def beats(self, pids: Mapping[str, int]) -> dict[str, HeartbeatRecord | None]:
        """The heartbeat of each stage of this round (``pids``): the display's one source."""
        found: dict[str, HeartbeatRecord | None] = {}
        for script, pid in pids.items():
            key = self.layout.heartbeat(script, self.env["WORKER_ID"])
            try:
                body = self.records.get_json(key)
                beat = HeartbeatRecord.from_json(key, body) if isinstance(body, dict) else None
            except (MigrationError, OSError):
                beat = None  # the display waits for the next look; the stages go on
            found[script] = beat if beat is not None and beat.pid == pid else None  # not an earlier round's
        return found

    def run_round(self, scripts: Sequence[str]) -> dict[str, int]:
        """Start ``scripts`` together and wait for the three to end; a stage that ends with 1 or 2
        stops the others (they resume on the next run)."""
        stages = [Stage(s, self.env, self.display.line) for s in scripts]
        pids = {stage.script: stage.proc.pid for stage in stages}
        codes: dict[str, int] = {}
        stopping = False
        next_look = 0.0
        while len(codes) < len(stages):
            for stage in stages:
                if stage.script not in codes and (code := stage.code()) is not None:
                    codes[stage.script] = code
                    if code in PERSON_MUST_ACT and not stopping:
                        stopping = True
                        self.display.say("error", f"{stage.script} ended with exit {code}: stopping the others")
                        for other in stages:
                            other.signal(signal.SIGTERM)
            if self.signum is not None and not stopping:
                stopping = True
                for stage in stages:
                    stage.signal(self.signum)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + self.settings.tick_s
                self.display.update(self.beats(pids), codes)
            time.sleep(0.2)
        self.display.update({}, codes)
        self.seen.update({s: beat for s, beat in self.beats(pids).items() if beat is not None})
        return {s: codes[s] for s in scripts}

    def pause(self) -> dict | None:
        try:
            body = self.records.get_json(self.layout.pause)
        except (MigrationError, OSError):
            return None
        return body if isinstance(body, dict) and isinstance(body.get("retry_after"), str) else None

    def wait_out(self, seconds: float) -> None:
        """A quota pause: until its end, or until the pause record is gone or ends sooner (a person
        lifted it), looked at every RERUN_BACKOFF seconds (at least 1, at most 600)."""
        end = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < end:
            self.sleep(min(max(1.0, min(600.0, self.settings.backoff_s)), end - time.monotonic()))
            pause = self.pause()
            if pause is None or parse_mtime(pause["retry_after"]) <= time.time():
                self.display.say("info", "the quota pause at DESTINATION has ended; going on")
                return

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))


def drive(m: Migration) -> int:
    """Rounds until the migration is done, a person must act, or MAX_ROUNDS is spent (a round
    that ended in a quota pause waited out does not count)."""
    scripts: Sequence[str] = STAGES
    round_no, spent = 1, 0
    while True:
        m.display.say("info", f"round {round_no}: starting {', '.join(SCRIPT_FILES[s] for s in scripts)} together")
        codes = {s: EXIT_OK for s in STAGES} | m.run_round(scripts)
        m.rounds = round_no
        if m.signum is not None:
            return 128 + m.signum
        pause = m.pause()
        verdict = judge(codes, paused=pause is not None)
        told = f"round {round_no}: exit codes " + ", ".join(f"{s} {codes[s]}" for s in scripts)
        if verdict.action == "done":
            return m.end("info", f"{told}: the migration is restored and verified", EXIT_OK)
        if verdict.action == "stop":
            return m.end("error", f"{told}: {verdict.why}; stopping with exit {verdict.code}", verdict.code)
        if verdict.action == "quota":
            if not m.settings.wait_for_quota:
                return m.end("error", f"{told}: DESTINATION refused uploads for a provider quota until "
                                      f"{pause['retry_after']}; run python migrate.py again then (WAIT_FOR_QUOTA=1 "
                                      "waits it out)", EXIT_TEMPORARY)
            wait = max(0.0, parse_mtime(pause["retry_after"]) - time.time()) + 5
            m.display.say("warning", f"{told}: DESTINATION is paused for a quota until {pause['retry_after']}: "
                                     f"waiting {wait / 3600:.1f} h (WAIT_FOR_QUOTA=1)")
            m.notifier.tell(Notice("warning", f"migrate.py: paused until {pause['retry_after']}",
                                   f"DESTINATION refused uploads for a provider quota; migrate.py waits until "
                                   f"{pause['retry_after']} (WAIT_FOR_QUOTA=1), then goes on"))
            m.wait_out(wait)
        else:
            spent += 1
            if spent >= m.settings.max_rounds:
                return m.end("error", f"{told}; {spent} rounds of MAX_ROUNDS={m.settings.max_rounds} done and work "
                                      "is left: see the lines above, python migrate.py --status, then run python "
                                      "migrate.py again", verdict.code)
            wait = pause_before(spent + 1, m.settings.backoff_s)
            m.display.say("warning", f"{told}: work is left; running again from {SCRIPT_FILES[verdict.stage]} in "
                                     f"{wait:.0f} s (round {spent + 1} of at most {m.settings.max_rounds})")
            m.sleep(wait)
        if m.signum is not None:
            return 128 + m.signum
        round_no += 1
        scripts = STAGES[STAGES.index(verdict.stage):]


# Notifications

def migration_notice(m: Migration, code: int) -> Notice | None:
    """What the command's end tells NOTIFY_URLS, once for the three stages (they do not)."""
    stages = "; ".join(f"{s}: {count(b.units_done, 'unit')} ({human_bytes(b.bytes_done)})"
                       + (f", {b.units_failed} failed" if b.units_failed else "") for s, b in m.seen.items())
    took = f"in {(time.monotonic() - m.started) / 60:.1f} min"
    if code == EXIT_OK:
        return Notice("success", "migration restored and verified",
                      f"the migration is restored and verified at DESTINATION {took}: {stages}")
    if code in (EXIT_PARTIAL, EXIT_WAITING):
        return Notice("warning", "migrate.py: partly done", f"{m.told}\n{stages}\nA rerun continues.")
    if code == EXIT_TEMPORARY and "quota" in m.told:
        return Notice("warning", "migrate.py: paused for a quota", m.told)
    if code in PERSON_MUST_ACT:
        causes = [f"{s}: {b.last_error[:300]}" for s, b in m.seen.items() if b.last_error]
        return Notice("failure", f"migrate.py: {'a person must act' if code == EXIT_USAGE else 'failed'} "
                                 f"(exit {code})", "\n".join([m.told, *causes]))
    return None


def notify_failure(unit: str, environ: Mapping[str, str],
                   send: Callable[[str, Notice], bool] | None = None) -> int:
    """``--notify-failure UNIT``: systemd's OnFailure= unit tells NOTIFY_URLS that UNIT failed
    (systemd 251+ passes the unit's result and exit status). Never fails: 0 whether or not sent."""
    setup_logging("INFO", "text", SCRIPT)
    urls = split_notify_urls(environ.get("NOTIFY_URLS"))
    if not urls:
        log.info("NOTIFY_URLS is not set: %s failed, nobody is told", unit)
        return EXIT_OK
    result = environ.get("MONITOR_SERVICE_RESULT") or "failed"
    status = environ.get("MONITOR_EXIT_STATUS") or "unknown"
    if result == "exit-code" and status in (str(EXIT_FAILED), str(EXIT_USAGE), str(EXIT_TEMPORARY)):
        # The script told these itself (75 for a quota pause; another instance's lock needs nobody).
        log.info("%s exited %s: told by the script itself", unit, status)
        return EXIT_OK
    sent = Notifier(urls, send=send).tell(Notice("failure", f"{unit} failed", f"systemd unit {unit} failed on "
                                      f"{os.uname().nodename}: {result}, exit status {status}; see journalctl -u "
                                      f"{unit}"))
    log.info("%s failed: %s %s", unit, "told" if sent else "not told to",
             ", ".join(notify_scheme(u) for u in urls))
    return EXIT_OK


# Starting

def check_configuration(environ: Mapping[str, str]) -> Config:
    """Every stage's configuration, checked once here rather than three times by the stages; the
    unzipper's is the one this command uses for the bucket."""
    cfg = None
    for script in STAGES:
        cfg = Config.from_env(environ, script)
    return cfg


def stage_env(environ: Mapping[str, str], tty: bool) -> dict:
    """The stages' environment: one WORKER_ID for the three (each script has its own heartbeat
    key, so the display reads three records), and heartbeats every 5 s for a terminal's bars."""
    env = dict(environ)
    env.setdefault("WORKER_ID", f"{re.sub(r'[^A-Za-z0-9._-]', '-', os.uname().nodename)[:60]}-"
                                f"{os.getpid()}-{os.urandom(3).hex()}")
    if tty:
        env.setdefault("PROGRESS_INTERVAL", "5")
    env.pop("COLUMNS", None)
    env["NOTIFY_BY_PARENT"] = "1"  # this command tells the migration's end, once (a stall each stage tells)
    return env


def help_text() -> str:
    own = variables_help(SCRIPT).split("\n", 1)[1]
    names = [n for n in dict.fromkeys(n for s in STAGES for n in _shown(s)) if n not in _shown(SCRIPT)]
    stages = textwrap.fill("The stages read theirs, as when they run one by one (python master_mapper.py --help, "
                           "and the same for the others): " + ", ".join(names) + ".", 103)
    return (__doc__.strip() + "\n\nEnvironment variables of this command (default in brackets):\n" + own
            + "\n\n" + stages + "\n\nIt ends with the most severe exit code of its last round:\n\n" + EXIT_CODES_HELP)


def _shown(script: str) -> list[str]:
    return re.findall(r"^  ([A-Z][A-Z0-9_]+)", variables_help(script), re.M)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    if argv == ["--status"] or ("--html" in argv and len(argv) <= 3):
        # python_unzipper.py checks --html FILE as it does its own.
        return subprocess.call([sys.executable, os.path.join(HERE, SCRIPT_FILES["unzipper"])] + argv)
    if len(argv) == 2 and argv[0] == "--notify-failure":
        return notify_failure(argv[1], environ)
    early = early_exit(SCRIPT, __doc__, argv, (), help_text)
    if early is not None:
        return early
    fmt = (environ.get("LOG_FORMAT") or "text").lower()
    setup_logging("INFO", fmt if fmt in ("text", "json") else "text", SCRIPT)
    tty = sys.stderr.isatty()
    for line in near_misses(environ):
        log.warning("%s", line)
    try:
        cfg = check_configuration(environ)
        settings = Settings.from_env(environ, tty)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        log.error("invalid configuration (the variable is named above); fix it and run python migrate.py again; "
                  "nothing was started")
        Notifier(split_notify_urls(environ.get("NOTIFY_URLS"))).tell(Notice(
            "failure", "migrate.py: a person must act (exit 2)", f"configuration: {exc}; nothing was started"))
        return EXIT_USAGE
    env = stage_env(environ, tty)
    setup_logging("INFO", fmt if fmt in ("text", "json") else "text", SCRIPT, env["WORKER_ID"])
    m = Migration(cfg, env, Records(make_s3_client(cfg), cfg), Layout(cfg.prefix), settings,
                  Display(tty, fmt == "json"), notifier=Notifier(cfg.notify_urls))
    old = {s: signal.signal(s, lambda signum, _f: setattr(m, "signum", signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = drive(m)
    finally:
        m.display.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if code >= 128:
        log.error("stopped by signal %d; every stage saved its progress; run python migrate.py again to continue",
                  code - 128)
    if not cfg.dry_run:
        m.notifier.tell(migration_notice(m, code))
    if fmt == "json":  # the command's last line, as each stage's: its exit code
        log_event(log, logging.INFO, "summary", {"exit_code": code, "rounds": m.rounds}, "summary: exit %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
