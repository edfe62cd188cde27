#!/usr/bin/env python3
"""Checks what Docker and Kubernetes cannot check here (no Docker engine or cluster on these
machines): the compose file parses and points at files that exist, the Dockerfile is made of known
instructions, and the Kubernetes manifests parse, point at files and objects that exist, probe
health services Touchline serves and give pods time to drain."""
import pathlib
import sys
import tomllib

try:
    import yaml
except ImportError:  # a machine without PyYAML that could not install it: the Dockerfile is checked
    yaml = None

DEPLOY = pathlib.Path(__file__).resolve().parent
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def check_compose() -> list[str]:
    problems = []
    if yaml is None:
        print("deploy/ checks: PyYAML is not installed, compose.yaml is not checked", file=sys.stderr)
        return problems
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose.get("services", {})
    for name in ("kafka", "ingest", "projector"):
        if name not in services:
            problems.append(f"compose.yaml has no service {name}")
    if not str(services.get("kafka", {}).get("image", "")).startswith("apache/kafka:"):
        problems.append("the kafka service does not use the official apache/kafka image")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (DEPLOY / source).exists():
                    problems.append(f"service {name} mounts {source}, which does not exist")
            elif source not in compose.get("volumes", {}):
                problems.append(f"service {name} uses volume {source}, which is not declared")
        build = service.get("build")
        if build and not (DEPLOY / build["context"] / build["dockerfile"]).exists():
            problems.append(f"service {name} builds from a Dockerfile that does not exist")
    return problems


def check_dockerfile() -> list[str]:
    problems = []
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    continued = False
    first = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not continued:
            word = stripped.split()[0].upper()
            first = first or word
            if word not in INSTRUCTIONS:
                problems.append(f"Dockerfile line {number}: unknown instruction {word}")
        continued = stripped.endswith("\\")
    if first != "FROM":
        problems.append("Dockerfile does not start with FROM")
    return problems


HEALTH_SERVICES = {"", "liveness", "touchline.v1.IngestService", "touchline.v1.TimelineService",
                   "touchline.v1.AdminService"}


def check_kubernetes() -> list[str]:
    problems = []
    if yaml is None:
        print("deploy/ checks: PyYAML is not installed, kubernetes/ is not checked", file=sys.stderr)
        return problems
    folder = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    config_maps = {}
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=")[-1]
            if not (folder / source).exists():
                problems.append(f"configMap {generator['name']} reads {source}, which does not exist")
                continue
            config_maps[generator["name"]] = tomllib.loads((folder / source).read_text())
    for resource in kustomization.get("resources", []):
        if not (folder / resource).exists():
            problems.append(f"kustomization lists {resource}, which does not exist")
            continue
        for document in yaml.safe_load_all((folder / resource).read_text()):
            if not document:
                continue
            name = document.get("metadata", {}).get("name")
            if not document.get("apiVersion") or not document.get("kind") or not name:
                problems.append(f"{resource}: a document without apiVersion, kind or name")
                continue
            if document["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = document["spec"]["template"]["spec"]
            if pod.get("enableServiceLinks") is not False:
                problems.append(f"{name}: enableServiceLinks must be false (Touchline does not "
                                "use their variables)")
            config = None
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    config = config_maps.get(volume["configMap"]["name"])
                    if config is None:
                        problems.append(f"{name} mounts configMap {volume['configMap']['name']}, "
                                        "which is not generated")
                if "secret" in volume and volume["secret"]["secretName"] != "touchline-partners":
                    problems.append(f"{name} mounts an unknown secret")
            for container in pod["containers"]:
                context = container.get("securityContext", {})
                if context.get("allowPrivilegeEscalation") is not False \
                        or "ALL" not in context.get("capabilities", {}).get("drop", []):
                    problems.append(f"{name}: the container may escalate privileges or keeps "
                                    "capabilities")
                ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
                for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                    probe = container.get(kind, {}).get("grpc")
                    if probe is None:
                        continue
                    if probe.get("service") not in HEALTH_SERVICES:
                        problems.append(f"{name} {kind} asks for health service "
                                        f"{probe.get('service')!r}, which Touchline does not serve")
                    if probe.get("port") != ports.get("grpc"):
                        problems.append(f"{name} {kind} probes another port than grpc")
            if config is not None:
                server = config.get("server", {})
                drain_ms = server.get("shutdown-delay-ms", 0) + server.get("shutdown-grace-ms", 10000)
                if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= drain_ms:
                    problems.append(f"{name}: terminationGracePeriodSeconds is not above the "
                                    "shutdown delay and grace")
    return problems


problems = check_compose() + check_dockerfile() + check_kubernetes()
for problem in problems:
    print(problem, file=sys.stderr)
print("deploy/ checks:", "failed" if problems else "ok")
sys.exit(1 if problems else 0)
