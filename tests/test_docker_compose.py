"""docker-compose.yaml, Dockerfile and .env.example agree with each other and the repo.

No Docker engine here: the files are parsed and cross-checked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
INIT_DIR = ROOT / "docker" / "postgres-init"

SECRETS_CHECK = "check-secrets"
AIRFLOW_SERVICES = ["airflow-init", "airflow-api-server", "airflow-scheduler",
                    "airflow-dag-processor", "airflow-triggerer", "airflow-worker"]
LONG_RUNNING = [s for s in AIRFLOW_SERVICES if s != "airflow-init"] + ["postgres", "redis"]
MOUNTED_FOLDERS = ["dags", "plugins", "dbt_project", "include"]
CHANNEL_CONNECTIONS = ["RETENTION_SENDGRID", "RETENTION_FCM", "RETENTION_TELEGRAM",
                       "RETENTION_SMS", "RETENTION_VIBER"]  # ids of retention.connections

# ${NAME}, ${NAME:-default}, ${NAME:?message}; "$${...}" is an escaped literal for the container
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def resolve(value: str) -> str:
    """Substitute every ${VAR...} with a placeholder, as compose would with a .env."""
    return VARIABLE.sub(lambda m: f"value-of-{m.group(1).lower()}", value)


def strings(node) -> list[str]:
    """Every string value of the parsed file (what compose interpolates; comments are not)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def env_example() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            entries[name.strip()] = value.strip()
    return entries


def test_every_required_service_exists(services):
    assert set(AIRFLOW_SERVICES + ["postgres", "redis"]) <= set(services)
    assert services["postgres"]["image"].split(":")[1].startswith("16")


def test_airflow_services_share_one_image_and_the_celery_executor(services):
    builds = {repr(services[s].get("build")) for s in AIRFLOW_SERVICES}
    images = {services[s].get("image") for s in AIRFLOW_SERVICES}
    assert len(builds) == 1 and len(images) == 1, (builds, images)
    build = services["airflow-scheduler"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
            "http://airflow-api-server:8080/execution/"), name
    commands = {services[s].get("command") for s in AIRFLOW_SERVICES}
    assert {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"} <= commands


def test_urls_point_at_services_and_databases_that_exist(services):
    env = services["airflow-worker"]["environment"]
    init_script = "\n".join(p.read_text() for p in sorted(INIT_DIR.iterdir()))
    created = set(re.findall(r"create database (\w+)", init_script, re.I))
    assert created == {"airflow", "warehouse"}
    expectations = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": ("postgres", "airflow"),
        "AIRFLOW__CELERY__RESULT_BACKEND": ("postgres", "airflow"),
        "RETENTION_DATABASE_URL": ("postgres", "warehouse"),
        "AIRFLOW__CELERY__BROKER_URL": ("redis", "0"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": ("airflow-api-server", "execution"),
    }
    for name, (host, path) in expectations.items():
        url = urlsplit(resolve(env[name]).removeprefix("db+"))
        assert url.hostname in services and url.hostname == host, name
        assert url.path.strip("/") == path, name
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    # the init script is what the postgres image runs on an empty volume
    mounts = services["postgres"]["volumes"]
    assert "./docker/postgres-init:/docker-entrypoint-initdb.d:ro" in mounts
    assert any(m.endswith(":/var/lib/postgresql/data") and not m.startswith(".") for m in mounts)


def test_mounted_folders_exist_in_the_repo(compose, services):
    for name in AIRFLOW_SERVICES + ["postgres"]:
        for mount in services[name].get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_dir(), f"{name} mounts missing folder {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    targets = {m.split(":")[1]: m.split(":")[0] for m in services["airflow-worker"]["volumes"]}
    for folder in MOUNTED_FOLDERS:
        assert targets[f"/opt/airflow/{folder}"] == f"./{folder}"


def test_healthchecks_and_start_order(services):
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends[SECRETS_CHECK]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-api-server"]["condition"] == (
        "service_healthy")
    init_env = services["airflow-init"]["environment"]
    assert init_env["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init_env["_AIRFLOW_WWW_USER_CREATE"] == "true"


def test_every_variable_is_documented_in_env_example(compose):
    used = {m.group(1) for value in strings(compose) for m in VARIABLE.finditer(value)}
    documented = env_example()
    assert used, "no ${VAR} found: the pattern is broken"
    assert sorted(used - set(documented)) == []
    assert "AIRFLOW_JWT_SECRET" in used
    for name, value in documented.items():  # placeholders only
        if re.search(r"PASSWORD|SECRET|FERNET", name):
            assert value == "change-me", name


def test_secrets_come_from_the_environment_only(text, services):
    assert "${AIRFLOW_JWT_SECRET:?set it in .env}" in text
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            value = str(value)
            if re.search(r"(PASSWORD|SECRET|SECRET_KEY|FERNET_KEY|TOKEN|API_KEY|_AUTH)$", key):
                match = VARIABLE.fullmatch(value)
                assert match and match.group(2) != ":-", f"{name}: {key} is not ${{VAR:?}}"
            if key.startswith("AIRFLOW_CONN_"):
                assert VARIABLE.fullmatch(value), f"{name}: {key} is a literal"
            for credentials in re.findall(r"://([^@/\s]*)@", value):
                password = credentials.partition(":")[2]
                assert not password or VARIABLE.fullmatch(password), f"{name}: {key}"
    literal_secret = re.compile(
        r"(password|passwd|secret|api[_-]?key|token)\s*[=:]\s*['\"]?(?!\$\{)[A-Za-z0-9+/_.-]{6,}"
        r"|SG\.[\w-]{16,}|AIza[\w-]{30,}|-----BEGIN|\b\d{8,10}:[\w-]{30,}", re.I)
    offending = [line for line in text.splitlines()
                 if not line.lstrip().startswith("#") and literal_secret.search(line)]
    assert offending == []
    assert {f"AIRFLOW_CONN_{c}" for c in CHANNEL_CONNECTIONS} <= set(
        services["airflow-worker"]["environment"])


def test_image_matches_the_installed_airflow_and_installs_requirements():
    dockerfile = DOCKERFILE.read_text()
    [tag] = re.findall(r"^FROM\s+apache/airflow:(\S+)", dockerfile, re.M)
    assert tag.split("-")[0] == version("apache-airflow") == "3.3.2"
    assert tag.endswith("-python3.11")
    assert re.search(r"^COPY\b.*\brequirements\.txt\b", dockerfile, re.M)
    assert re.search(r"pip install[^\n]*(\\\n[^\n]*)*-r\s+\S*requirements\.txt", dockerfile)
    assert re.search(r"pip install[^\n]*-e /opt/airflow", dockerfile)  # the project package
    requirements = (ROOT / "requirements.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\[\]-]+)==(\S+)", requirements, re.M))
    assert pins["apache-airflow"] == version("apache-airflow")
    assert "dbt-postgres" in pins and "dbt-core" in pins and "great-expectations" in pins


# --------------------------------------------------------------------------- exposure


def with_defaults(value: str) -> str:
    """Substitute every ${VAR...} as compose does with an empty .env: the default of
    ${VAR:-default}, else nothing."""
    return VARIABLE.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else "", value)


def test_no_published_port_listens_on_every_interface_by_default(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as \"address:host:container\""
            published[name] = with_defaults(port)
            address = published[name].rsplit(":", 2)[0] if published[name].count(":") == 2 else ""
            assert address in ("127.0.0.1", "::1", "[::1]"), (
                f"{name} publishes {port!r} on every interface by default")
    assert published["airflow-api-server"] == "127.0.0.1:8080:8080"
    assert published["postgres"] == "127.0.0.1:5432:5432"
    # the address is configurable
    [api_port] = services["airflow-api-server"]["ports"]
    assert api_port.startswith("${AIRFLOW_API_BIND:-127.0.0.1}:")
    assert env_example()["AIRFLOW_API_BIND"] == "127.0.0.1"


# --------------------------------------------------------------------------- placeholders


def secret_variables(compose) -> set[str]:
    """Every variable compose requires (${NAME:?...}) whose name says it is a secret."""
    return {m.group(1) for value in strings(compose) for m in VARIABLE.finditer(value)
            if m.group(2) == ":?" and re.search(r"PASSWORD|SECRET|FERNET", m.group(1))}


def check_script(services) -> str:
    """The secret check's shell script as the container receives it ($$ unescaped)."""
    command = services[SECRETS_CHECK]["command"]
    assert command[:2] == ["sh", "-c"], command
    script = command[2]
    assert not VARIABLE.search(script), "compose would interpolate the script"
    return script.replace("$$", "$")


def run_check(services, values: dict[str, str]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **values}
    return subprocess.run([shutil.which("sh") or "/bin/sh", "-c", check_script(services)],
                          env=env, capture_output=True, text=True, timeout=30)


def test_every_service_waits_for_the_secret_check(services):
    check = services[SECRETS_CHECK]
    assert check.get("restart") == "no"
    assert "ports" not in check and "depends_on" not in check
    for name, service in services.items():
        if name == SECRETS_CHECK:
            continue
        depends = service.get("depends_on") or {}
        assert SECRETS_CHECK in depends, f"{name} does not wait for {SECRETS_CHECK}"
        assert depends[SECRETS_CHECK]["condition"] == "service_completed_successfully", name


def test_the_check_covers_every_required_secret(compose, services):
    secrets = secret_variables(compose)
    assert {"RETENTION_PROMO_SECRET", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD",
            "AIRFLOW_FERNET_KEY", "AIRFLOW_ADMIN_PASSWORD"} <= secrets
    env = services[SECRETS_CHECK]["environment"]
    assert set(env) == secrets
    for name in secrets:
        assert env[name] == f"${{{name}:?set it in .env}}", name
        assert re.search(rf"\b{name}\b", check_script(services)), f"the script skips {name}"


def test_the_check_refuses_the_env_example_placeholders(compose, services):
    example = env_example()
    secrets = secret_variables(compose)
    proc = run_check(services, {name: example[name] for name in secrets})
    assert proc.returncode != 0
    for name in secrets:
        assert example[name] == "change-me"
        assert name in proc.stderr, (name, proc.stderr)


@pytest.mark.parametrize("placeholder", ["change-me", "CHANGE-ME", " change-me ", "", "   "])
def test_the_check_names_the_one_placeholder_left(compose, services, placeholder):
    values = {name: f"real-{i}-9d1c2f0e7a" for i, name in enumerate(sorted(secret_variables(compose)))}
    values["RETENTION_PROMO_SECRET"] = placeholder
    proc = run_check(services, values)
    assert proc.returncode != 0
    assert "RETENTION_PROMO_SECRET" in proc.stderr
    others = set(values) - {"RETENTION_PROMO_SECRET"}
    assert not [n for n in others if n in proc.stderr], proc.stderr


def test_the_check_passes_real_secrets(compose, services):
    values = {name: f"real-{i}-9d1c2f0e7a" for i, name in enumerate(sorted(secret_variables(compose)))}
    proc = run_check(services, values)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for value in values.values():
        assert value not in proc.stdout  # the check never prints a secret


# --------------------------------------------------------------------------- pools


def init_steps(services) -> list[list[str]]:
    """The airflow-init command's `&&`-separated steps, each split as bash would."""
    args = shlex.split(services["airflow-init"]["command"])
    assert args[:2] == ["bash", "-c"], args
    return [shlex.split(step) for step in args[2].split("&&")]


def test_airflow_init_creates_the_pools_the_code_uses(services):
    """The pools `retention airflow up` creates (one per provider, derived from the campaign
    DAG builder) are the pools the compose deployment creates, each only when missing."""
    from retention_airflow.local import DEFAULT_POOL_SLOTS, provider_pools

    created = {}
    for step in init_steps(services):
        if "pools" not in step:
            continue
        # (airflow pools get NAME >/dev/null 2>&1 || airflow pools set NAME SLOTS 'text')
        assert step[0] == "(airflow" and step[1:3] == ["pools", "get"], step
        name = step[3]
        assert step[step.index("||") + 1:step.index("||") + 4] == ["airflow", "pools", "set"], step
        set_args = step[step.index("||") + 4:]
        assert set_args[0] == name, step
        assert set_args[-1].endswith(")") and set_args[-1].strip(")"), step  # a description
        created[name] = int(set_args[1])
    assert sorted(created) == provider_pools()
    assert set(created.values()) == {DEFAULT_POOL_SLOTS}


# --------------------------------------------------------------------------- Celery


def test_compose_runs_the_celery_shape_of_retention_airflow_up(services, tmp_path):
    """docker-compose.yaml and `retention airflow up --executor celery --workers 2` (the
    deployment tests/test_celery.py kills a worker of) are one shape: the CeleryExecutor,
    two workers with their own Celery node names, the result backend in the metadata
    database, the same worker slots, and a campaign step's send shards all able to run at
    once within the provider pool airflow-init creates."""
    import json

    from retention.config import Settings
    from retention_airflow.local import (DEFAULT_POOL_SLOTS, DEFAULT_WORKER_CONCURRENCY,
                                         LocalAirflow)

    worker = services["airflow-worker"]
    assert worker["command"] == "celery worker"
    assert worker["deploy"]["replicas"] == 2
    assert "hostname" not in worker and "container_name" not in worker  # a name per replica
    compose_env = worker["environment"]

    local = LocalAirflow(home=tmp_path)
    local.state_file.write_text(json.dumps({
        "port": 8080, "log_ports": [8793, 8794], "executor": "celery",
        "workers": ["worker-1", "worker-2"], "broker_url": "redis://127.0.0.1:6379/0",
        "worker_concurrency": DEFAULT_WORKER_CONCURRENCY,
        "worker_log_ports": {"worker-1": 8795, "worker-2": 8796}}))
    local_env = local.environment("postgresql://airflow:secret@127.0.0.1:5432/airflow_meta")
    assert local.components()[-2:] == ("worker-1", "worker-2")

    assert local_env["AIRFLOW__CORE__EXECUTOR"] == compose_env["AIRFLOW__CORE__EXECUTOR"]
    celery_keys = {k for k in local_env if k.startswith("AIRFLOW__CELERY__")}
    assert celery_keys == {"AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
                           "AIRFLOW__CELERY__WORKER_CONCURRENCY"}
    assert celery_keys <= set(compose_env)
    for env in (local_env, compose_env):
        broker = urlsplit(resolve(env["AIRFLOW__CELERY__BROKER_URL"]))
        assert broker.scheme == "redis" and broker.path.strip("/").isdigit()
        backend = urlsplit(resolve(env["AIRFLOW__CELERY__RESULT_BACKEND"]).removeprefix("db+"))
        metadata = urlsplit(resolve(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]))
        assert backend.scheme.startswith("postgresql")
        assert (backend.hostname, backend.path) == (metadata.hostname, metadata.path)
        assert int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]) == DEFAULT_WORKER_CONCURRENCY

    shards = int(compose_env["RETENTION_SEND_SHARDS"])
    assert shards == Settings.model_fields["send_shards"].default
    assert 2 <= shards <= DEFAULT_POOL_SLOTS  # every shard of a step runs at once
