#!/usr/bin/env python3
"""Checks what Docker cannot check here (no Docker engine on these machines): the compose file
parses and points at files that exist, and the Dockerfile is made of known instructions."""
import pathlib
import sys

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


problems = check_compose() + check_dockerfile()
for problem in problems:
    print(problem, file=sys.stderr)
print("deploy/ checks:", "failed" if problems else "ok")
sys.exit(1 if problems else 0)
