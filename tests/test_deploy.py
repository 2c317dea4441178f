"""The packaging, checked offline: every manifest parses and hangs together, the probes hit real
endpoints on the port the config listens on, the shipped configs pass `gateway check` (and the
Kubernetes one really serves its probes), and the Dockerfile builds a non-root image with a
working HEALTHCHECK. Docker itself is not run: there is no engine on the test machines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.tokens.signer import generate_private_pem
from tests.support.gateway_process import start_gateway
from tests.support.ports import free_port
from tests.support.redis_server import start_redis

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
REQUIRED_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                  "PodDisruptionBudget"}


# --- loading --------------------------------------------------------------------------------
def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None and path.name != "kustomization.yaml":
                docs.append((path, doc))
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number or a named container port) as a number."""
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container()["ports"]}
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def configmap_config() -> str:
    return str(one("ConfigMap")["data"]["gateway.yaml"])


def config_values(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def gateway_check(path: Path,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True,
        text=True, timeout=60, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    return generate_private_pem("EdDSA")


def materialise_k8s_config(directory: Path, users_file: Path, key_pem: bytes,
                           replace: dict[str, str] | None = None) -> Path:
    """The ConfigMap's config with every file it names provided where the pod mounts it: the
    path must fall under a Secret volume of the Deployment that has that key."""
    text = configmap_config()
    pod = one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Secret"}
    values = config_values(text)
    for path in (values["tokens"]["signing_key_file"], values["users"]["file"]):
        mount = next((m for m in container()["volumeMounts"]
                      if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        assert mount is not None, f"{path} is not under any volumeMount"
        volume = volumes[mount["name"]]
        assert "secret" in volume, f"{path} should come from a Secret"
        item = path[len(mount["mountPath"].rstrip("/")) + 1:]
        placeholder = secrets[volume["secret"]["secretName"]]
        assert item in placeholder.get("stringData", {}), f"Secret lacks key {item}"
        local = directory / mount["name"] / item
        local.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".pem"):
            local.write_bytes(key_pem)
        else:
            shutil.copy(users_file, local)
        text = text.replace(path, str(local))
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    out = directory / "gateway.yaml"
    out.write_text(text)
    return out


# --- Kubernetes -----------------------------------------------------------------------------
def test_every_manifest_parses_with_kind_and_name() -> None:
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        list(yaml.safe_load_all(path.read_text()))  # raises on a syntax error
    kinds = set()
    for path, doc in manifests():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert doc["metadata"].get("name"), path
        kinds.add(doc["kind"])
    assert REQUIRED_KINDS <= kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # The placeholder Secrets must not overwrite real ones on `kubectl apply -k`.
    assert "secret.yaml" not in kustomization["resources"]
    listed = set(kustomization["resources"]) | {"secret.yaml", "kustomization.yaml"}
    assert {p.name for p in K8S.glob("*.yaml")} == listed


def test_probes_hit_health_endpoints_on_the_configured_port() -> None:
    c = container()
    values = config_values(configmap_config())
    listen_port = values["listen"]["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container_port(c["readinessProbe"]["httpGet"]["port"]) == listen_port
    assert container_port(c["livenessProbe"]["httpGet"]["port"]) == listen_port
    # The metrics admin listener is a container port and what the scrape annotation names.
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == values["metrics"]["port"]
    assert container_port("metrics") == values["metrics"]["port"]
    assert annotations["prometheus.io/path"] == values["metrics"].get("path", "/metrics")
    # The image's HEALTHCHECK probes $GATEWAY_PORT: it must be the listen port too.
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GATEWAY_PORT"] == str(listen_port)


def test_pod_is_non_root_read_only_and_bounded() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    assert pod["automountServiceAccountToken"] is False
    # Draining needs the grace period to outlast the config's drain_timeout.
    drain = config_values(configmap_config())["listen"]["drain_timeout"]
    assert pod["terminationGracePeriodSeconds"] > int(drain.rstrip("s"))
    # Every env var the config interpolates is provided by the pod.
    names = {e["name"] for e in c["env"]}
    assert set(re.findall(r"\$\{(\w+)", configmap_config())) <= names


def test_service_hpa_and_pdb_target_the_deployment() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: container_port(p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports["http"] == config_values(configmap_config())["listen"]["port"]
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # A budget that cannot be met with the minimum replica count would block every node drain.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    # Probes and containers reference volumes and config that exist.
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in container()["volumeMounts"]} <= volumes
    config_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                         if "configMap" in v)
    assert config_volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]


def test_configmap_config_passes_gateway_check(
    tmp_path: Path, users_file: Path, key_pem: bytes
) -> None:
    values = config_values(configmap_config())
    # Production-style: shared Redis, a mounted key, metrics off the public port.
    assert values["redis"]["url"].startswith(("redis://", "rediss://"))
    assert values["tokens"]["signing_key_file"].startswith("/etc/gateway/keys/")
    assert values["metrics"]["port"] != values["listen"]["port"]
    path = materialise_k8s_config(tmp_path, users_file, key_pem)
    done = gateway_check(path, {"REDIS_PASSWORD": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    # The check is real: the same config with a key file that holds no key is refused.
    bad = tmp_path / "bad"
    bad.mkdir()
    path = materialise_k8s_config(bad, users_file, b"-----BEGIN PRIVATE KEY-----\nno\n")
    done = gateway_check(path, {"REDIS_PASSWORD": "s3cret"})
    assert done.returncode != 0
    assert "signing_key_file" in done.stderr or "tokens" in done.stderr


def _healthcheck_argv() -> list[str]:
    instructions = dockerfile_stages()[-1]
    args = next(a for k, a in instructions if k == "HEALTHCHECK")
    cmd = json.loads(args[args.index("CMD") + 3:].strip())
    assert isinstance(cmd, list) and cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def test_configmap_config_serves_its_probes_and_the_image_healthcheck_works(
    tmp_path: Path, users_file: Path, key_pem: bytes
) -> None:
    """The ConfigMap's config run for real (loopback instead of 0.0.0.0, a local Redis with a
    password instead of the cluster service): the probe and scrape paths answer."""
    password = "pw-" + os.urandom(8).hex()
    redis = start_redis("--requirepass", password)
    metrics_port = free_port()
    gw = None
    try:
        path = materialise_k8s_config(tmp_path, users_file, key_pem, replace={
            "host: 0.0.0.0\n  port: 8080": "host: 127.0.0.1\n  port: {port}",
            "redis.gateway.svc.cluster.local:6379": f"127.0.0.1:{redis.port}",
            "host: 0.0.0.0\n  port: 9090": f"host: 127.0.0.1\n  port: {metrics_port}",
        })
        gw = start_gateway(tmp_path, path.read_text(), env={"REDIS_PASSWORD": password})
        c = container()
        assert httpx.get(gw.url + c["livenessProbe"]["httpGet"]["path"]).status_code == 200
        assert httpx.get(gw.url + c["readinessProbe"]["httpGet"]["path"]).status_code == 200
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scrape.status_code == 200
        assert "gateway_requests_total" in scrape.text
        # Metrics are on the admin port only, not on the public one.
        assert httpx.get(gw.url + "/metrics").status_code == 404

        argv = _healthcheck_argv()
        env = {**os.environ, "GATEWAY_PORT": str(gw.port)}
        assert subprocess.run(argv, env=env, capture_output=True, timeout=10,
                              check=False).returncode == 0
        gw.stop()
        assert subprocess.run(argv, env=env, capture_output=True, timeout=10,
                              check=False).returncode != 0
    finally:
        if gw is not None:
            gw.stop()
        redis.stop()
        shutil.rmtree(redis.workdir, ignore_errors=True)


# --- Dockerfile -----------------------------------------------------------------------------
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    lines = [ln for ln in (REPO / "Dockerfile").read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args.strip()))
    return stages


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    base = final[0][1]
    arg = re.match(r"\$\{(\w+)\}", base)
    if arg:  # FROM ${PYTHON_IMAGE}: resolve the ARG default
        base = re.search(rf"ARG {arg.group(1)}=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert re.match(r"python:3\.1[1-9][\w.-]*-slim", base), base
    build_names = [s[0][1].split(" AS ")[-1].split(" as ")[-1] for s in stages[:-1]]
    copies = [a for k, a in final if k == "COPY" and a.startswith("--from=")]
    assert copies and all(c.split()[0].removeprefix("--from=") in build_names for c in copies)

    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")

    # No compilers or package-manager installs in the image that ships.
    final_runs = " ".join(a for k, a in final if k == "RUN")
    for tool in ("build-essential", "gcc", "apt-get install", "curl", "wget"):
        assert tool not in final_runs, tool

    healthchecks = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0]

    entrypoint = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in final if k == "CMD"))
    argv = entrypoint + cmd
    assert argv[:2] == ["gateway", "serve"] and "/etc/gateway/gateway.yaml" in argv
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert config_values(configmap_config())["listen"]["port"] in exposed


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for pattern in (".git", "tests", "**/*.pem", "keys"):
        assert pattern in ignored, pattern
    copied = []
    for stage in dockerfile_stages():
        for keyword, args in stage:
            if keyword == "COPY" and not args.startswith("--from="):
                copied += args.split()[:-1]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is copied but ignored"


# --- Docker Compose -------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_compose_references_services_and_files_that_exist() -> None:
    services = compose()["services"]
    assert {"gateway", "redis", "upstream"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    # The gateway config names hosts that are compose services, on the ports they serve.
    gateway_config = _compose_config_text()
    assert "redis://redis:6379" in gateway_config
    upstreams = [r["upstream"] for r in config_values(gateway_config)["routes"]]
    for host, port in re.findall(r"http://([a-z][\w-]*):(\d+)", " ".join(upstreams)):
        assert host in services, host
        assert f"port={port}" in " ".join(services[host].get("entrypoint", [])), host
    published = {p.rsplit(":", 1)[-1] for p in services["gateway"]["ports"]}
    assert str(config_values(gateway_config)["listen"]["port"]) in published


def _compose_config_text() -> str:
    volumes = compose()["services"]["gateway"]["volumes"]
    source = next(v.split(":")[0] for v in volumes
                  if v.split(":")[1] == "/etc/gateway/gateway.yaml")
    return (DEPLOY / source).read_text()


def test_compose_gateway_config_passes_gateway_check(tmp_path: Path, key_pem: bytes) -> None:
    """Container paths mapped back to the files compose mounts there; the key is generated
    (the compose key directory is git-ignored and empty in a checkout)."""
    text = _compose_config_text()
    mounts = {}
    for volume in compose()["services"]["gateway"]["volumes"]:
        host, container_path = volume.split(":")[:2]
        mounts[container_path] = (DEPLOY / host).resolve()
    values = config_values(text)
    for path in (values["tokens"]["signing_key_file"], values["users"]["file"]):
        if path in mounts:
            assert mounts[path].is_file(), path
            text = text.replace(path, str(mounts[path]))
            continue
        parent = next(c for c in mounts if path.startswith(c.rstrip("/") + "/"))
        assert mounts[parent].is_dir()
        local = tmp_path / Path(path).name
        local.write_bytes(key_pem)
        text = text.replace(path, str(local))
    out = tmp_path / "gateway.yaml"
    out.write_text(text)
    done = gateway_check(out)
    assert done.returncode == 0, done.stderr
