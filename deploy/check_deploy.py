#!/usr/bin/env python3
"""Checks what Docker and Kubernetes cannot check here (no Docker engine or cluster on these
machines): the compose file parses and points at files that exist, the Dockerfile is made of known
instructions, and the Kubernetes manifests parse, point at files and objects that exist, probe
health services Touchline serves and give pods time to drain."""
import pathlib
import sys
try:
    import tomllib  # Python 3.11 and later
except ImportError:  # older Pythons: the manifests' configuration files are not checked
    tomllib = None

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
    kafka = services.get("kafka", {})
    log_dirs = str(kafka.get("environment", {}).get("KAFKA_LOG_DIRS", ""))
    mounted = [volume.split(":")[1] for volume in kafka.get("volumes", []) if ":" in volume]
    if log_dirs not in mounted:
        problems.append(
            f"the kafka service writes its log to {log_dirs or 'the image default'}, "
            f"not to a mounted volume ({', '.join(mounted) or 'none'})"
        )
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
    if tomllib is None:
        print("deploy/ checks: tomllib needs Python 3.11, the configMaps' TOML is not checked "
              "(the rest of kubernetes/ is)", file=sys.stderr)
    folder = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    config_maps = {}
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=")[-1]
            if not (folder / source).exists():
                problems.append(f"configMap {generator['name']} reads {source}, which does not exist")
                continue
            text = (folder / source).read_text()
            # Without tomllib: known to exist, its content unchecked.
            config_maps[generator["name"]] = tomllib.loads(text) if tomllib else {}
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
            if config is not None and tomllib is not None:
                server = config.get("server", {})
                drain_ms = server.get("shutdown-delay-ms", 0) + server.get("shutdown-grace-ms", 10000)
                if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= drain_ms:
                    problems.append(f"{name}: terminationGracePeriodSeconds is not above the "
                                    "shutdown delay and grace")
    return problems


def check_backup() -> list[str]:
    """The backup CronJob (applied on its own): a restricted pod that runs `touchline backup`
    with the admin token from its Secret into the backups volume."""
    problems = []
    if yaml is None:
        return problems
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "backup.yaml").read_text()) if d]
    claims = {d["metadata"]["name"] for d in documents if d.get("kind") == "PersistentVolumeClaim"}
    jobs = [d for d in documents if d.get("kind") == "CronJob"]
    if len(jobs) != 1:
        return ["backup.yaml: expected one CronJob"]
    job = jobs[0]["spec"]
    if job.get("concurrencyPolicy") != "Forbid":
        problems.append("backup CronJob: concurrencyPolicy must be Forbid (one backup at a time)")
    pod = job["jobTemplate"]["spec"]["template"]["spec"]
    if pod.get("enableServiceLinks") is not False:
        problems.append("backup CronJob: enableServiceLinks must be false")
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append("backup CronJob: the pod must not run as root")
    for volume in pod.get("volumes", []):
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in claims:
            problems.append(f"backup CronJob mounts claim {claim}, which backup.yaml does not declare")
    for container in pod["containers"]:
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False \
                or "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append("backup CronJob: the container may escalate privileges or keeps capabilities")
        kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
        tagged = {
            i["name"]: f'{i.get("newName", i["name"])}@{i["digest"]}' if "digest" in i
            else f'{i.get("newName", i["name"])}:{i.get("newTag", "latest")}'
            for i in kustomization.get("images", [])
        }
        if container.get("image") != tagged.get("touchline"):
            problems.append(f"backup CronJob: image {container.get('image')} is not the kustomization's {tagged.get('touchline')}")
        script = " ".join(container.get("command", []) + container.get("args", []))
        if "touchline backup --out" not in script:
            problems.append("backup CronJob: the container does not run touchline backup --out")
        env = {e["name"]: e for e in container.get("env", [])}
        token = env.get("TOUCHLINE_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        if token is None:
            problems.append("backup CronJob: TOUCHLINE_ADMIN_TOKEN does not come from a Secret")
        if "TOUCHLINE_ENDPOINT" not in env:
            problems.append("backup CronJob: no TOUCHLINE_ENDPOINT")
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if "/backups" not in mounts:
            problems.append("backup CronJob: nothing is mounted at /backups, where it writes")
    return problems


problems = check_compose() + check_dockerfile() + check_kubernetes() + check_backup()
for problem in problems:
    print(problem, file=sys.stderr)
print("deploy/ checks:", "failed" if problems else "ok")
sys.exit(1 if problems else 0)
