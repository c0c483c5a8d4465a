"""Helpers of the access suite: certificates made with the ``openssl`` command, and a private
``redis-server`` whose default user has a password, with a TLS port when the build has TLS.

The ACL a girder user needs is defined once, here (``GIRDER_ACL``): the tests grant exactly it,
and the README's ``ACL SETUSER`` line must spell it (``acl_setuser_line``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from girder_celery.testing import RedisServer, free_port, redis_server_binary

LUA = Path(__file__).resolve().parent.parent / "girder_celery" / "lua"

#: What girder's client sends itself (store.py, link.py, worker.py), beside the scripts. A new
#: one belongs here and in the README's line: until then the end-to-end ACL test refuses it.
CLIENT_COMMANDS = (
    "evalsha",  # every transition (the scripts of lua/), called by SHA
    "script|load",  # loading them, before the first unawaited send and after a restart forgot them
    "ping",  # a worker checks the store at start
    "hgetall",  # girder.state(): a request record
    "hget",  # the readable request of a key, for messages
    "zcard", "zrange", "time",  # girder.offers(): a queue's offers and Redis's clock
    "blmpop",  # a waiter pops its mailbox (BLPOP before Redis 7)
    "srem", "del",  # a waiter that gives up withdraws its mailbox
    "hmget", "scan", "info",  # the reports: graphs, stats, active requests, forget --task
    "exists", "pexpire",  # keeping a top-level request's graph whole: a batch asked at once, each extended
    "multi", "exec",  # reset_stats: counters dropped and restarted in one step
    # a cancel's walk (tree.py), and on a Redis Cluster what follows a transition in other slots:
    "smembers", "rpush", "pexpire", "zadd", "zrem", "hincrby", "hsetnx",
)  # fmt: skip


def script_commands() -> set[str]:
    """The commands the Lua scripts call (lower case), read from lua/*.lua."""
    text = "\n".join(p.read_text() for p in sorted(LUA.glob("*.lua")))
    return {name.lower() for name in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", text)}


#: The commands of a girder user's ACL, sorted: the client's and the scripts' (a script's calls
#: are checked against its caller's ACL).
GIRDER_ACL = tuple(sorted({*CLIENT_COMMANDS, *script_commands()}))


def acl_rules(prefix: str, password: str, redis_version: str = "7", without: tuple[str, ...] = ()) -> list[str]:
    """The ``ACL SETUSER <user>`` rules of a girder user on keys ``<prefix>:*``: nothing else
    (and not the commands ``without``). Before Redis 7 there is no BLMPOP: girder uses BLPOP;
    and no PEXPIRE ... GT: it reads graphs' TTLs with PTTL."""
    commands = GIRDER_ACL if int(redis_version.split(".")[0]) >= 7 else _before_7()
    granted = (f"+{c}" for c in commands if c not in without)
    return ["reset", "on", f">{password}", f"~{prefix}:*", "resetchannels", *granted]


def _before_7() -> tuple[str, ...]:
    return tuple(sorted({*GIRDER_ACL, "blpop", "pttl"} - {"blmpop"}))


#: What a girder user needs besides on a Redis Cluster: redis-py's cluster client reads the slot
#: map (``CLUSTER SLOTS``) and the commands' key positions (``COMMAND``) as it connects.
CLUSTER_RULES = ("+cluster|slots", "+command")


def acl_setuser_line(cluster: bool = False) -> str:
    """The README's ready-to-paste line, for the default prefix (on a Redis Cluster's masters)."""
    return " ".join(["ACL SETUSER girder", *acl_rules("girder", "PASSWORD"), *(CLUSTER_RULES if cluster else ())])


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """Paths of a test PKI: ``ca`` signs ``server`` and ``client``; ``other_ca`` signs ``stranger``."""

    ca: Path
    other_ca: Path
    server: tuple[Path, Path]  # (certificate, key)
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]


def openssl_missing() -> str | None:
    """None if the ``openssl`` command is on PATH, else why the certificates cannot be made."""
    return None if shutil.which("openssl") else "no openssl command on PATH to make test certificates with"


def make_certificates(directory: Path) -> Certificates:
    """Two CAs and three leaf certificates (EC P-256, valid two days) in ``directory``."""
    ca, other = _ca(directory, "ca"), _ca(directory, "other-ca")
    return Certificates(
        ca=ca[0],
        other_ca=other[0],
        server=_leaf(directory, "server", ca, "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        client=_leaf(directory, "client", ca, "clientAuth"),
        stranger=_leaf(directory, "stranger", other, "clientAuth"),
    )


_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-new", *_NEW_KEY, "-keyout", key, "-out", crt, "-days", "2",
             "-subj", f"/CN=girder test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return crt, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], usage: str, extra: str = "") -> tuple[Path, Path]:
    crt, key, csr, ext = (directory / f"{name}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{extra}"
    )
    _openssl("req", "-new", *_NEW_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN=girder test {name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", f"0x{uuid.uuid4().hex}",
             "-out", crt, "-days", "2", "-extfile", ext)  # fmt: skip
    return crt, key


# -- the server --------------------------------------------------------------------------------


def tls_missing(binary: str) -> str | None:
    """None if ``binary`` was built with TLS, else why not (a build without it knows no
    ``tls-cert-file`` directive, and refuses ``--tls-port`` as a bad directive)."""
    if b"tls-cert-file" in Path(binary).read_bytes():
        return None
    return f"{binary} was built without TLS (BUILD_TLS=yes); point $GIRDER_REDIS_SERVER at a redis-server that has it"


class AccessServer:
    """A private ``redis-server`` whose default user needs ``ADMIN_PASSWORD``, for the access
    tests: its plain port serves the test's own (admin) client, and ``tls_port``, when the build
    has TLS, serves TLS only and wants a client certificate from ``certs.ca``."""

    ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex[:8]

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="girder-access-"))
        self.no_tls = tls_missing(redis_server_binary()) or openssl_missing()
        self.certs = make_certificates(self.dir) if self.no_tls is None else None
        self.tls_port = free_port() if self.certs else None
        self.server = RedisServer(password=self.ADMIN_PASSWORD, args=self._tls_args())

    def _tls_args(self) -> list[str]:
        if self.certs is None:
            return []
        c = self.certs
        return ["--tls-port", str(self.tls_port), "--tls-cert-file", str(c.server[0]), "--tls-key-file",
                str(c.server[1]), "--tls-ca-cert-file", str(c.ca), "--tls-auth-clients", "yes"]  # fmt: skip

    def start(self) -> AccessServer:
        self.server.start()
        return self

    @property
    def admin(self) -> redis.Redis:
        return self.server.client()

    def grant(self, user: str, prefix: str, password: str, without: tuple[str, ...] = ()) -> None:
        """(Re)create ``user`` with exactly girder's ACL on keys ``<prefix>:*`` (but ``without``)."""
        rules = acl_rules(prefix, password, self.server.version(), without)
        self.admin.execute_command("ACL", "SETUSER", user, *rules)

    def url(self, user: str = "", password: str = "", db: int = 0) -> str:
        """A plain URL of the server for ``user`` (none: the default user), with ``password``."""
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        return f"redis://{auth}127.0.0.1:{self.server.port}/{db}"

    def tls_url(self, user: str, password: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> str:
        """A ``rediss://`` URL of the TLS port trusting ``ca`` (default: the server's CA) and
        showing client certificate ``cert`` (default: the CA's client; ``()``: none)."""
        assert self.certs is not None, self.no_tls
        ca = ca or self.certs.ca
        cert = self.certs.client if cert is None else cert
        query = [("ssl_ca_certs", ca), *((("ssl_certfile", cert[0]), ("ssl_keyfile", cert[1])) if cert else ())]
        params = "&".join(f"{name}={quote(str(path))}" for name, path in query)
        return f"rediss://{user}:{password}@127.0.0.1:{self.tls_port}/0?{params}"

    def denials(self) -> list[dict]:
        """What the server's ACL log holds: each refused command, key or login."""
        return self.admin.acl_log()

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)
