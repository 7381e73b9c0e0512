"""The packaging files agree with each other and with the code: deploy/ (container config and
Kubernetes manifests), the Dockerfile, and the version metadata.

The install itself (wheel, sdist, twistd plugin, a real hub started from the wheel) is checked
by packaging/check-install.sh (`make package-check`).
"""

from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import tomllib
from importlib import metadata
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, TestCase

import cloudhub
from cloudhub.config import HubConfig, parse_config
from cloudhub.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
MANIFEST = os.path.join(DEPLOY, "kubernetes", "cloudhub.yaml")
CONTAINER_CONFIG = os.path.join(DEPLOY, "cloudhub.container.yaml")
DOCKERFILE = os.path.join(REPO, "Dockerfile")
LOOPBACK = ("127.0.0.1", "::1")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _documents(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_read(path)) if doc is not None]


def _one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in documents if doc.get("kind") == kind]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT (the shell form is refused)."""
    value = json.loads(arguments)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise AssertionError(f"not an exec-form command: {arguments}")
    return value


class Deployment:
    """The Kubernetes manifest, its objects and the hub config its ConfigMap holds."""

    def __init__(self) -> None:
        self.documents = _documents(MANIFEST)
        self.configmap = _one(self.documents, "ConfigMap")
        self.claim = _one(self.documents, "PersistentVolumeClaim")
        self.deployment = _one(self.documents, "Deployment")
        self.service = _one(self.documents, "Service")
        self.pod = self.deployment["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.mounts = {m["name"]: m for m in self.container["volumeMounts"]}
        (self.config_key,) = self.configmap["data"]
        self.config_text = self.configmap["data"][self.config_key]

    def config(self) -> HubConfig:
        return parse_config(yaml.safe_load(self.config_text), "ConfigMap " + self.config_key)

    def mount_of(self, volume_kind: str, name: str) -> str:
        """The mount path of the volume of this kind that refers to ``name``."""
        for volume in self.volumes.values():
            source = volume.get(volume_kind) or {}
            if name in (source.get("name"), source.get("claimName")):
                return str(self.mounts[volume["name"]]["mountPath"])
        raise AssertionError(f"no {volume_kind} volume for {name}")

    def container_port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container["ports"]:
            if port["name"] == name_or_number:
                return int(port["containerPort"])
        raise AssertionError(f"no container port named {name_or_number}")


class Dockerfile:
    def __init__(self) -> None:
        self.instructions = dockerfile_instructions(_read(DOCKERFILE))
        stages = [i for i, (word, _) in enumerate(self.instructions) if word == "FROM"]
        # The final stage: what the image is.
        self.final = self.instructions[stages[-1] :]

    def last(self, word: str) -> str:
        values = [rest for w, rest in self.final if w == word]
        if not values:
            raise AssertionError(f"the final stage has no {word}")
        return values[-1]

    def command(self) -> list[str]:
        entrypoint = [rest for w, rest in self.final if w == "ENTRYPOINT"]
        return (exec_form(entrypoint[-1]) if entrypoint else []) + exec_form(self.last("CMD"))

    def config_path(self) -> str:
        command = self.command()
        if "--config" not in command:
            raise AssertionError(f"no --config in {command}")
        return command[command.index("--config") + 1]

    def copied_to(self, source: str) -> str:
        """Where a ``COPY source dest`` of the final stage puts ``source``."""
        for word, rest in self.final:
            parts = rest.split()
            if word == "COPY" and source in parts[:-1]:
                return parts[-1]
        raise AssertionError(f"the final stage copies no {source}")

    def arg_default(self, name: str) -> str:
        for word, rest in self.final:
            if word == "ARG" and rest.startswith(name + "="):
                return rest.split("=", 1)[1]
        raise AssertionError(f"no ARG {name}")


class DeployDocumentsTests(TestCase):
    def test_every_yaml_under_deploy_parses(self):
        paths = []
        for directory, _, files in os.walk(DEPLOY):
            paths += [os.path.join(directory, f) for f in files if f.endswith((".yaml", ".yml"))]
        self.assertIn(MANIFEST, paths)
        self.assertIn(CONTAINER_CONFIG, paths)
        for path in paths:
            documents = _documents(path)
            self.assertTrue(documents, path)
            if os.path.dirname(path) == os.path.dirname(MANIFEST):
                for doc in documents:
                    self.assertTrue(set(doc) >= {"apiVersion", "kind", "metadata"}, (path, doc))
                    self.assertTrue(doc["metadata"].get("name"), (path, doc["kind"]))

    def test_kinds(self):
        kinds = sorted(doc["kind"] for doc in Deployment().documents)
        self.assertEqual(kinds, ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"])


class ConfigTests(TestCase):
    def test_configmap_config_is_valid(self):
        config = Deployment().config()
        self.assertEqual(config.cloudhub.websocket.address, "0.0.0.0")
        self.assertEqual(config.cloudhub.https.address, "0.0.0.0")

    def test_configmap_check_is_real(self):
        """A wrong value in the ConfigMap's text fails the check above."""
        text = Deployment().config_text.replace("port: 10000", "port: 99999", 1)
        self.assertIn("99999", text)
        with self.assertRaises(ConfigError):
            parse_config(yaml.safe_load(text))

    def test_container_config_matches_configmap(self):
        container = parse_config(yaml.safe_load(_read(CONTAINER_CONFIG)), CONTAINER_CONFIG)
        self.assertEqual(container.as_dict(), Deployment().config().as_dict())

    def test_api_not_published_without_token(self):
        """The API queues messages to every edge: off loopback only with a token."""
        for config in (
            Deployment().config(),
            parse_config(yaml.safe_load(_read(CONTAINER_CONFIG))),
        ):
            api = config.hub.api
            if api.enable and api.address not in LOOPBACK:
                self.assertTrue(api.token, "hub.api is published without a token")

    def test_data_dir_is_the_volume(self):
        manifest = Deployment()
        config = manifest.config()
        data_dir = config.hub.data_dir
        self.assertEqual(manifest.mount_of("persistentVolumeClaim", "cloudhub-data"), data_dir)
        self.assertEqual(manifest.claim["metadata"]["name"], "cloudhub-data")
        volume = Dockerfile().last("VOLUME")
        self.assertIn(data_dir, json.loads(volume) if volume.startswith("[") else volume.split())
        self.assertTrue(config.store_path.startswith(data_dir + "/"))


class DockerfileTests(TestCase):
    def test_command_config_is_the_configmap_mount(self):
        dockerfile = Dockerfile()
        manifest = Deployment()
        path = dockerfile.config_path()
        self.assertNotIn("command", manifest.container)
        self.assertNotIn("args", manifest.container)
        mount = manifest.mount_of("configMap", manifest.configmap["metadata"]["name"])
        self.assertEqual(posixpath.dirname(path), mount)
        self.assertEqual(posixpath.basename(path), manifest.config_key)
        # The image's own default config is the container sample.
        self.assertEqual(dockerfile.copied_to("deploy/cloudhub.container.yaml"), path)

    def test_command_runs_the_hub_in_the_foreground(self):
        command = Dockerfile().command()
        self.assertEqual(command[0], "twistd")
        self.assertIn("-n", command[: command.index("cloudhub")])
        self.assertIn("--pidfile=", command)
        logger = command[command.index("--logger") + 1]
        module, _, name = logger.rpartition(".")
        self.assertTrue(callable(getattr(__import__(module, fromlist=[name]), name)))

    def test_user_is_the_pods(self):
        dockerfile = Dockerfile()
        manifest = Deployment()
        uid = dockerfile.arg_default("CLOUDHUB_UID")
        self.assertEqual(dockerfile.last("USER"), "${CLOUDHUB_UID}:${CLOUDHUB_UID}")
        context = manifest.pod["securityContext"]
        self.assertIs(context["runAsNonRoot"], True)
        self.assertEqual(str(context["runAsUser"]), uid)
        self.assertEqual(str(context["fsGroup"]), uid)
        self.assertIs(manifest.container["securityContext"]["readOnlyRootFilesystem"], True)

    def test_exposed_ports_are_the_configs(self):
        config = Deployment().config()
        exposed = Dockerfile().last("EXPOSE").split()
        for port in (config.cloudhub.websocket.port, config.cloudhub.https.port):
            self.assertIn(str(port), exposed)

    def test_installs_with_packaging_script(self):
        self.assertIn(
            "packaging/install.sh /opt/cloudhub",
            " ".join(rest for word, rest in Dockerfile().final if word == "RUN").replace(
                "/usr/local/lib/cloudhub/install.sh", "packaging/install.sh"
            ),
        )
        self.assertEqual(
            Dockerfile().copied_to("packaging/install.sh"), "/usr/local/lib/cloudhub/install.sh"
        )

    def test_healthcheck_asks_the_certificate_server(self):
        config = Deployment().config()
        check = Dockerfile().last("HEALTHCHECK")
        self.assertIn(f"https://127.0.0.1:{config.cloudhub.https.port}/readyz", check)
        source = exec_form(check[check.index("CMD") + 3 :].strip())[-1]
        ast.parse(source)


class KubernetesTests(TestCase):
    def test_single_writer(self):
        spec = Deployment().deployment["spec"]
        self.assertEqual(spec["replicas"], 1)
        self.assertEqual(spec["strategy"]["type"], "Recreate")
        self.assertEqual(Deployment().claim["spec"]["accessModes"], ["ReadWriteOnce"])

    def test_probes_reach_the_certificate_server(self):
        manifest = Deployment()
        https = manifest.config().cloudhub.https
        self.assertNotIn(https.address, LOOPBACK)  # the kubelet probes the pod IP
        paths = {}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = manifest.container[probe]["httpGet"]
            self.assertEqual(get["scheme"], "HTTPS")
            self.assertEqual(manifest.container_port(get["port"]), https.port)
            paths[probe] = get["path"]
        self.assertEqual(paths["readinessProbe"], "/readyz")
        self.assertEqual(paths["livenessProbe"], "/healthz")

    def test_service_targets_the_listeners(self):
        manifest = Deployment()
        hub = manifest.config().cloudhub
        self.assertEqual(
            manifest.service["spec"]["selector"],
            manifest.deployment["spec"]["selector"]["matchLabels"],
        )
        self.assertTrue(
            manifest.deployment["spec"]["selector"]["matchLabels"].items()
            <= manifest.deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        targets = {
            manifest.container_port(port["targetPort"]): port["protocol"]
            for port in manifest.service["spec"]["ports"]
        }
        self.assertEqual(targets, {hub.websocket.port: "TCP", hub.https.port: "TCP"})


class VersionTests(TestCase):
    def test_one_version_source(self):
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)
        self.assertNotIn("version", project["project"])
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(
            project["tool"]["setuptools"]["dynamic"]["version"], {"attr": "cloudhub.__version__"}
        )
        self.assertNotRegex(_read(os.path.join(REPO, "setup.py")), r"version\s*=")
        self.assertRegex(
            _read(os.path.join(REPO, "cloudhub", "__init__.py")),
            re.compile(r'^__version__ = "[^"]+"$', re.M),
        )

    def test_installed_metadata_has_the_version(self):
        try:
            installed = metadata.version("cloudhub")
        except metadata.PackageNotFoundError:
            raise SkipTest("cloudhub is not installed (pip install -e .)") from None
        self.assertEqual(installed, cloudhub.__version__)
