"""The image tier (`make test-images`, after `make test`): build the CPU services image with Docker on the
local debootstrap base (no registry here), run the dev broker and `forgerl serve datapool` from it as the
chart runs them (uid 10001, read-only root, no capabilities), and see SERVING from the host on a published
127.0.0.1 port. The Docker engine is started here if none runs (without touching iptables) and stopped
again; nothing is left but the images."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgerl.runtime.client import health_status

pytestmark = pytest.mark.images

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ROOT / "images" / ".build" / "services"
BASE = "local/debian-base:bookworm"
IMAGE = "forgerl.local/forgerl-services:test"
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# What the chart's securityContext asks of every ForgeRL container.
HARDENED = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def wait_for(what: str, check: object, timeout_s: float, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine: the one running, or dockerd started with --iptables=false (the FORWARD policy and
    NAT rules stay as they are: the local sandboxes rely on them) and stopped at the end."""
    if docker("info", check=False).returncode == 0:
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["dockerd", "--iptables=false"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("dockerd", lambda: proc.poll() is None and docker("info", check=False).returncode == 0, 60)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def base_image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """local/debian-base:bookworm from debootstrap (about a minute), unless it exists already."""
    if docker("image", "inspect", BASE, check=False).returncode == 0:
        return BASE
    rootfs = tmp_path_factory.mktemp("rootfs")
    mirror = next(line.split()[1] for line in SOURCES.read_text().splitlines() if line.startswith("URIs:"))
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], check=True, timeout=600)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES.read_text())
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=300)
    assert tar.wait() == 0
    return BASE


@pytest.fixture(scope="module")
def services_image(base_image: str) -> str:
    assert (CONTEXT / "requirements.txt").exists(), "run `python images/prepare.py services` first (make test-images)"
    # --network host: RUN's apt reaches the mirror without the NAT rules dockerd was told not to add.
    build = ["build", "--network", "host", "-q", "-f", str(ROOT / "images" / "services.Dockerfile")]
    docker(*build, "--build-arg", f"BASE_IMAGE={base_image}", "-t", IMAGE, str(CONTEXT), timeout=1200)
    return IMAGE


def test_services_image_runs_non_root_and_imports_every_service(services_image: str) -> None:
    script = (
        "import os, forgerl.services.gateway.main, forgerl.services.rollout.main, forgerl.services.trainer.main, "
        "forgerl.services.evolution.main, forgerl.services.datapool.main, forgerl.deploy.checks; print(os.getuid())"
    )
    result = docker("run", "--rm", *HARDENED, "--entrypoint", "python", services_image, "-c", script)
    assert result.stdout.strip() == "10001", result.stderr
    config = docker("image", "inspect", services_image, "--format", "{{.Config.User}} {{json .Config.Entrypoint}}")
    assert config.stdout.strip() == '10001:10001 ["forgerl"]'


def test_datapool_container_serves_beside_the_dev_broker(services_image: str) -> None:
    """The chart's dev profile in two containers: `tansu broker` and `forgerl serve datapool` with its
    FORGERL_DATAPOOL_* keys, on a network of their own; health checked from the host."""
    suffix = uuid.uuid4().hex[:8]
    network, broker, datapool = f"forgerl-test-{suffix}", f"broker-{suffix}", f"datapool-{suffix}"
    docker("network", "create", network)
    try:
        docker("run", "-d", "--name", broker, "--network", network, *HARDENED, "--entrypoint", "tansu", services_image,
               "broker", "--listener-url", "tcp://0.0.0.0:9092", "--advertised-listener-url", f"tcp://{broker}:9092",
               "--storage-engine", "memory://tansu/")  # fmt: skip
        env = {"HOST": "0.0.0.0", "KAFKA_BOOTSTRAP": f"{broker}:9092", "STATE_DIR": "/var/lib/forgerl"}
        env_args = [a for k, v in env.items() for a in ("-e", f"FORGERL_DATAPOOL_{k}={v}")]
        started = time.monotonic()
        docker("run", "-d", "--name", datapool, "--network", network, *HARDENED, "--tmpfs",
               "/var/lib/forgerl:uid=10001,gid=10001", *env_args, "-p", "127.0.0.1::50051", services_image,
               "serve", "datapool")  # fmt: skip
        address = docker("port", datapool, "50051").stdout.splitlines()[0]
        assert address.startswith("127.0.0.1:")
        wait_for(
            "datapool SERVING",
            lambda: health_status(address, "forgerl.v1.DatapoolService") == "SERVING",
            120,
        )
        print(f"datapool SERVING {time.monotonic() - started:.1f} s after docker run, at {address}")
        logs = docker("logs", datapool).stderr + docker("logs", datapool).stdout
        assert f"{broker}:9092" in logs  # it reached the broker by the name the chart's Service would have
    finally:
        docker("rm", "-f", datapool, broker, check=False)
        docker("network", "rm", network, check=False)
    assert not docker("ps", "-a", "--filter", f"name={suffix}", "-q").stdout.strip()
