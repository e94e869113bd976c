"""Real servers on 127.0.0.1 that behave like cloud drives, as session fixtures, for end-to-end
tests of the pipeline with SOURCE or DESTINATION on them:

- ``sftp_server``: Debian's OpenSSH sshd (key login, a working shell for rclone's md5sum/sha1sum);
- ``webdav_server``: wsgidav on cheroot, anonymous;
- ``ftp_server``: pyftpdlib with a user and password, MFMT offered (rclone can set mtimes);
- ``ftp_server_nomfmt``: the same without MFMT, like many real FTP servers (it cannot).

Each yields a ``Backend``: ``root`` is the local folder the server serves (create SOURCE files
there, or compare DESTINATION with it byte for byte); ``remote_env`` defines the rclone remote
through ``RCLONE_CONFIG_<NAME>_*`` variables (merge it into a test's environment, with
``RCLONE_CONFIG`` pointing at an empty file); ``remote_path(sub)`` names ``root/sub`` through
rclone. The servers live for the whole session and are shared: give every test its own
subfolder. A server that does not start is an error, never a skip (CI must fail on it)."""

from __future__ import annotations

import getpass
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest

from e2ekit import rclone_binary

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Backend:
    """One running server and the rclone remote that reaches it."""

    name: str                 # the rclone remote's name, e.g. "sftptest"
    root: str                 # the local folder the server serves
    remote_env: dict          # RCLONE_CONFIG_<NAME>_* variables defining the remote
    remote: str               # rclone's name for root itself, e.g. "sftptest:/tmp/.../root"
    port: int = 0
    log: str = ""             # the server's stdout and stderr
    startup_seconds: float = 0.0   # the fixture's whole setup: keys, config, server, readiness
    extra: dict = field(default_factory=dict)   # per-backend facts (user, password, url...)

    def remote_path(self, sub: str = "") -> str:
        """rclone's name for ``root/sub`` (``sub`` relative, with ``/`` separators)."""
        sub = sub.strip("/")
        if not sub:
            return self.remote
        sep = "" if self.remote.endswith((":", "/")) else "/"
        return self.remote + sep + sub

    def local_path(self, sub: str = "") -> str:
        """The same place as ``remote_path(sub)``, on this machine."""
        return os.path.join(self.root, *[p for p in sub.split("/") if p])

    def server_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_prefix(name: str) -> str:
    return f"RCLONE_CONFIG_{name.upper()}_"


class _Server:
    """A server subprocess in its own process group, output to a log file."""

    def __init__(self, what: str, cmd: list[str], port: int, log: str, **popen):
        self.what, self.port, self.log = what, port, log
        started = time.monotonic()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, **popen)
        try:
            self._wait_for_port()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _output(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError as e:
            return f"(no log: {e})"

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with code {self.proc.returncode} before listening "
                                   f"on 127.0.0.1:{self.port}; its output:\n{self._output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not listen on 127.0.0.1:{self.port} within "
                                   f"{START_TIMEOUT:.0f} s; its output:\n{self._output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """End the server and whatever is left in its process group. The leader is waited for
        without being reaped until the group has had SIGKILL, so that the group id is still
        ours when it is signalled."""
        if self.proc.returncode is not None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                break
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


# --- SFTP: OpenSSH ------------------------------------------------------------------------------

def _ssh_keygen(path: str) -> None:
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backends-fixture", "-f", path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed ({proc.returncode}): {proc.stderr.strip()}")


def _check_ssh_shell(server: _Server, user: str, key: str, known_hosts: str) -> None:
    """Log in with the key and run md5sum, as rclone will: a clear error now (a locked account,
    a login shell such as nologin) instead of a puzzling one in the middle of a test."""
    cmd = ["ssh", "-F", "none", "-i", key, "-p", str(server.port), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "LogLevel=ERROR",
           "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", f"{user}@127.0.0.1", "echo ok | md5sum"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        out, err, rc = "", "timed out", None
    if rc != 0 or not out.startswith("eff5bc1ef8ec9d03e640fc4370f5eacd"):
        raise RuntimeError(f"sshd on 127.0.0.1:{server.port} is up but `ssh {user}@127.0.0.1 md5sum` failed "
                           f"(exit {rc}): {err.strip() or out.strip()}; sshd's output:\n{server._output()}")


def _start_sftp(base: str, name: str = "sftptest") -> tuple[Backend, _Server]:
    started = time.monotonic()
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} is missing: install Debian's openssh-server (.ci/run does)")
    root = os.path.join(base, "root")
    os.makedirs(root)
    host_key = os.path.join(base, "ssh_host_ed25519_key")
    client_key = os.path.join(base, "client_ed25519")
    _ssh_keygen(host_key)
    _ssh_keygen(client_key)
    authorized = os.path.join(base, "authorized_keys")
    with open(client_key + ".pub") as src, open(authorized, "w") as dst:
        dst.write(src.read())
    os.chmod(authorized, 0o600)
    # The account sshd runs as (a non-root sshd can only log that one in); the environment's
    # USER/LOGNAME, which getpass.getuser() reads first, can be stale after su or sudo.
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = getpass.getuser()
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation folder
    port = _free_port()
    config = os.path.join(base, "sshd_config")
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""\
            # written by tests/backends.py: one test sshd, key login for {user} only
            ListenAddress 127.0.0.1
            Port {port}
            HostKey {host_key}
            PidFile {os.path.join(base, "sshd.pid")}
            AuthorizedKeysFile {authorized}
            AllowUsers {user}
            StrictModes no
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            PermitRootLogin prohibit-password
            UseDNS no
            PrintMotd no
            PrintLastLog no
            X11Forwarding no
            AllowTcpForwarding no
            MaxStartups 64:30:200
            MaxSessions 64
            LogLevel INFO
            Subsystem sftp internal-sftp
            """))
    known_hosts = os.path.join(base, "known_hosts")   # real host key checking, and no NOTICE about it
    with open(host_key + ".pub") as src, open(known_hosts, "w") as dst:
        key_type, key = src.read().split()[:2]
        dst.write(f"[127.0.0.1]:{port} {key_type} {key}\n")
    server = _Server("sshd", [SSHD, "-D", "-e", "-f", config], port, os.path.join(base, "sshd.log"))
    try:
        _check_ssh_shell(server, user, client_key, known_hosts)
    except BaseException:
        server.stop()
        raise
    p = _config_prefix(name)
    env = {
        p + "TYPE": "sftp",
        p + "HOST": "127.0.0.1",
        p + "PORT": str(port),
        p + "USER": user,
        p + "KEY_FILE": client_key,
        p + "KNOWN_HOSTS_FILE": known_hosts,
        # known, so that rclone does not probe the shell on first use
        p + "SHELL_TYPE": "unix",
        p + "MD5SUM_COMMAND": "md5sum",
        p + "SHA1SUM_COMMAND": "sha1sum",
    }
    backend = Backend(name=name, root=root, remote_env=env, remote=f"{name}:{root}", port=port,
                      log=server.log, startup_seconds=time.monotonic() - started,
                      extra={"user": user, "key_file": client_key, "known_hosts": known_hosts,
                             "sshd_config": config})
    return backend, server


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory):
    """Debian's OpenSSH sshd on 127.0.0.1 (SFTP and a shell), key login as the current user."""
    backend, server = _start_sftp(str(tmp_path_factory.mktemp("sftp")))
    yield backend
    server.stop()


# --- WebDAV: wsgidav on cheroot -----------------------------------------------------------------

def _start_webdav(base: str, name: str = "davtest") -> tuple[Backend, _Server]:
    started = time.monotonic()
    root = os.path.join(base, "root")
    os.makedirs(root)
    port = _free_port()
    # --no-config: never pick up a wsgidav.yaml from the working folder
    cmd = [sys.executable, "-m", "wsgidav.server.server_cli", "--host", "127.0.0.1", "--port", str(port),
           "--root", root, "--auth", "anonymous", "--server", "cheroot", "--no-config", "-q"]
    server = _Server("wsgidav", cmd, port, os.path.join(base, "wsgidav.log"), cwd=base)
    url = f"http://127.0.0.1:{port}/"
    p = _config_prefix(name)
    env = {p + "TYPE": "webdav", p + "URL": url, p + "VENDOR": "other"}
    backend = Backend(name=name, root=root, remote_env=env, remote=f"{name}:", port=port, log=server.log,
                      startup_seconds=time.monotonic() - started, extra={"url": url})
    return backend, server


@pytest.fixture(scope="session")
def webdav_server(tmp_path_factory):
    """wsgidav (cheroot) on 127.0.0.1 serving a folder read-write, no authentication."""
    backend, server = _start_webdav(str(tmp_path_factory.mktemp("webdav")))
    yield backend
    server.stop()


# --- FTP: pyftpdlib -----------------------------------------------------------------------------

_FTP_SCRIPT = '''\
"""Test FTP server (tests/backends.py): one user with every permission, optionally no MFMT."""
import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

port, root, user, password, mfmt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

authorizer = DummyAuthorizer()
authorizer.add_user(user, password, root, perm="elradfmwMT")


class Handler(FTPHandler):
    def ftp_MLSD(self, path):
        # pyftpdlib answers 501 for a folder that does not exist, which rclone takes for an error,
        # not for "directory not found"; real servers (proftpd, pure-ftpd) answer 550.
        if not self.fs.lexists(path):
            self.respond("550 No such file or directory.")
            return None
        return super().ftp_MLSD(path)


Handler.authorizer = authorizer
Handler.banner = "test ftp ready"
if not mfmt:
    # Like many real servers: MFMT is neither accepted ("500 not understood") nor in FEAT,
    # which pyftpdlib builds from proto_cmds.
    Handler.proto_cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k != "MFMT"}

server = FTPServer(("127.0.0.1", port), Handler)
server.max_cons = 256
print(f"listening on 127.0.0.1:{port}, MFMT {'on' if mfmt else 'off'}", file=sys.stderr, flush=True)
server.serve_forever()
'''


def _obscure(password: str) -> str:
    proc = subprocess.run([rclone_binary(), "obscure", "--config", os.devnull, password],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"rclone obscure failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def _start_ftp(base: str, name: str, mfmt: bool) -> tuple[Backend, _Server]:
    started = time.monotonic()
    root = os.path.join(base, "root")
    os.makedirs(root)
    script = os.path.join(base, "ftp_server.py")
    with open(script, "w") as f:
        f.write(_FTP_SCRIPT)
    user, password = "ftpuser", "pw-" + secrets.token_hex(8)
    port = _free_port()
    cmd = [sys.executable, script, str(port), root, user, password, "1" if mfmt else "0"]
    server = _Server(f"pyftpdlib ({'with' if mfmt else 'without'} MFMT)", cmd, port,
                     os.path.join(base, "ftp.log"), cwd=base)
    try:
        obscured = _obscure(password)
    except BaseException:
        server.stop()
        raise
    p = _config_prefix(name)
    env = {p + "TYPE": "ftp", p + "HOST": "127.0.0.1", p + "PORT": str(port), p + "USER": user,
           p + "PASS": obscured}
    backend = Backend(name=name, root=root, remote_env=env, remote=f"{name}:", port=port, log=server.log,
                      startup_seconds=time.monotonic() - started,
                      extra={"user": user, "password": password, "mfmt": mfmt})
    return backend, server


@pytest.fixture(scope="session")
def ftp_server(tmp_path_factory):
    """pyftpdlib on 127.0.0.1, user and password, MFMT offered (rclone sets mtimes with it)."""
    backend, server = _start_ftp(str(tmp_path_factory.mktemp("ftp")), "ftptest", mfmt=True)
    yield backend
    server.stop()


@pytest.fixture(scope="session")
def ftp_server_nomfmt(tmp_path_factory):
    """The same FTP server without MFMT (not accepted, not in FEAT): rclone cannot set mtimes."""
    backend, server = _start_ftp(str(tmp_path_factory.mktemp("ftp-nomfmt")), "ftpnomfmt", mfmt=False)
    yield backend
    server.stop()
