"""A real S3 server for the replica tests: OpenStack Swift with its s3api middleware, from
Debian's packages (scripts/install.sh), one node with one device on a directory, as four plain
background processes (account, container, object, proxy) on 127.0.0.1 ports that were free.

No systemd and no memcached: a small in-process dict stands in for swift's cache (one proxy
process, so it is coherent). Processes are ended by their PIDs. ``stop`` and ``start`` again
keep the data and the ports: that is "the store went down and came back".

Client side: path-style addressing, SigV4, region us-east-1, access key ``test:tester``,
secret ``testing``; ``environment()`` gives the standard AWS variables for them.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian installs swift for the system interpreter
SERVERS = ("account", "container", "object", "proxy")
ACCOUNT, USER, SECRET = "test", "tester", "testing"


def swift_installed() -> bool:
    return shutil.which("swift-proxy-server") is not None and os.path.exists(SYSTEM_PYTHON)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_CACHE_MODULE = '''
"""swift.cache without memcached: a dict, for one proxy process."""
import time


class DictCache:
    def __init__(self):
        self._items = {}

    def _expiry(self, seconds):
        seconds = float(seconds or 0)
        if seconds <= 0:
            return None
        return seconds if seconds > 30 * 24 * 3600 else time.time() + seconds

    def get(self, key, *args, **kwargs):
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] < time.time():
            self._items.pop(key, None)
            return None
        return item[0]

    def set(self, key, value, serialize=True, time=0, *args, **kwargs):
        self._items[key] = (value, self._expiry(time))
        return True

    def incr(self, key, delta=1, time=0, *args, **kwargs):
        value = max(0, int(self.get(key) or 0) + int(delta))
        self._items[key] = (value, self._expiry(time))
        return value

    def decr(self, key, delta=1, time=0, *args, **kwargs):
        return self.incr(key, -delta, time)

    def delete(self, key, *args, **kwargs):
        self._items.pop(key, None)

    def get_multi(self, keys, server_key=None, *args, **kwargs):
        return [self.get(key) for key in keys]

    def set_multi(self, mapping, server_key=None, serialize=True, time=0, *args, **kwargs):
        for key, value in mapping.items():
            self.set(key, value, time=time)


def filter_factory(global_conf, **local_conf):
    cache = DictCache()

    def make(app):
        def dict_cache(environ, start_response):
            environ["swift.cache"] = cache
            return app(environ, start_response)
        return dict_cache
    return make
'''

# Runs a swift WSGI server reading swift.conf from our directory instead of /etc/swift.
_LAUNCHER = '''
import sys
swift_dir, server, conf = sys.argv[1:4]
sys.path.insert(0, swift_dir)
from swift.common import utils
utils.SWIFT_CONF_FILE = swift_dir + "/swift.conf"
utils.HASH_PATH_PREFIX = utils.HASH_PATH_SUFFIX = b""
utils.validate_configuration()
from swift.common import constraints, storage_policy
storage_policy.reload_storage_policies()
constraints.reload_constraints()
from swift.common.wsgi import run_wsgi
extra = {}
if server == "object-server":
    from swift.obj import server as object_server
    extra["global_conf_callback"] = object_server.global_conf_callback
sys.exit(run_wsgi(conf, server, verbose=True, **extra))
'''

_RINGS = '''
import sys
from swift.common.ring import RingBuilder
etc, ports = sys.argv[1], dict(zip(("object", "container", "account"), sys.argv[2:5]))
for name, port in ports.items():
    builder = RingBuilder(6, 1, 1)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 100, "meta": ""})
    builder.rebalance()
    builder.save(f"{etc}/{name}.builder")
    builder.get_ring().save(f"{etc}/{name}.ring.gz")
'''

_PROXY_PIPELINE = """
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api tempauth copy slo dlo proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
[filter:s3api]
use = egg:swift#s3api
location = us-east-1
storage_domain =
dns_compliant_bucket_names = true
allow_multipart_uploads = true
s3_acl = false
[filter:tempauth]
use = egg:swift#tempauth
user_{account}_{user} = {secret} .admin
[filter:cache]
paste.filter_factory = razorfs_test_cache:filter_factory
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
"""


class SwiftS3:
    """A single-node Swift with s3api in ``root``; ``start()``, ``stop()``, ``close()``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.etc = self.root / "etc"
        self.ports = {name: _free_port() for name in SERVERS}
        self.pids: dict[str, int] = {}
        self._configure()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": f"{ACCOUNT}:{USER}",
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def _common(self, server: str) -> str:
        return (f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {self.ports[server]}\n"
                f"workers = 0\nuser = root\nswift_dir = {self.etc}\n"
                f"devices = {self.root}/srv\nmount_check = false\ndisable_fallocate = true\n"
                f"log_name = {server}-server\nlog_level = WARNING\n"
                # /dev/log may not exist: syslog goes to a loopback port nobody reads
                "log_udp_host = 127.0.0.1\nlog_udp_port = 9\n"
                f"recon_cache_path = {self.root}/cache\n")

    def _configure(self) -> None:
        for sub in ("etc", "srv/d1", "log", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.etc / "swift.conf").write_text(
            f"[swift-hash]\nswift_hash_path_prefix = {secrets.token_hex(8)}\n"
            "swift_hash_path_suffix = razorfs\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n")
        for server in ("account", "container", "object"):
            (self.etc / f"{server}-server.conf").write_text(
                self._common(server) + f"[pipeline:main]\npipeline = {server}-server\n"
                f"[app:{server}-server]\nuse = egg:swift#{server}\n")
        (self.etc / "proxy-server.conf").write_text(self._common("proxy") + _PROXY_PIPELINE.format(
            account=ACCOUNT, user=USER, secret=SECRET))
        (self.etc / "razorfs_test_cache.py").write_text(_CACHE_MODULE)
        (self.etc / "launch.py").write_text(_LAUNCHER)
        subprocess.run([SYSTEM_PYTHON, "-c", _RINGS, str(self.etc), str(self.ports["object"]),
                        str(self.ports["container"]), str(self.ports["account"])],
                       check=True, capture_output=True)

    def start(self, timeout: float = 60.0) -> None:
        for server in SERVERS:
            log = open(self.root / "log" / f"{server}.log", "ab")
            with log:
                process = subprocess.Popen(
                    [SYSTEM_PYTHON, str(self.etc / "launch.py"), str(self.etc),
                     f"{server}-server", str(self.etc / f"{server}-server.conf")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            self.pids[server] = process.pid
            self._processes = getattr(self, "_processes", {})
            self._processes[server] = process
        deadline = time.monotonic() + timeout
        while not self._ready():
            for server, process in self._processes.items():
                if process.poll() is not None:
                    tail = (self.root / "log" / f"{server}.log").read_text()[-2000:]
                    self.stop()
                    raise RuntimeError(f"swift {server} server exited:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"swift did not answer within {timeout} s "
                                   f"(logs in {self.root / 'log'})")
            time.sleep(0.2)

    def _ready(self) -> bool:
        """The whole chain answers: a token from tempauth, then an object PUT through the
        proxy (proxy → account → container → object server)."""
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.ports["proxy"], timeout=5)
            connection.request("GET", "/auth/v1.0", headers={
                "X-Auth-User": f"{ACCOUNT}:{USER}", "X-Auth-Key": SECRET})
            answer = connection.getresponse()
            answer.read()
            token, url = answer.getheader("X-Auth-Token"), answer.getheader("X-Storage-Url")
            if answer.status != 200 or not token:
                return False
            path = "/" + url.split("/", 3)[3]
            connection.request("PUT", f"{path}/.razorfs-ready", headers={"X-Auth-Token": token})
            answer = connection.getresponse()
            answer.read()
            return answer.status in (201, 202)
        except OSError:
            return False

    def stop(self) -> None:
        """End the servers (SIGTERM, then SIGKILL after 5 s), by PID."""
        processes = getattr(self, "_processes", {})
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes = {}
        self.pids = {}

    @property
    def running(self) -> bool:
        return any(process.poll() is None for process in getattr(self, "_processes", {}).values())
