"""HubConfig: cloudcore-compatible keys, our own section, one clear line per error."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cloudhub.config import HubConfig, load_config, parse_config
from cloudhub.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLOUDCORE_YAML = """\
apiVersion: cloudcore.config.kubeedge.io/v1alpha2
kind: CloudCore
kubeAPIConfig:
  kubeConfig: /root/.kube/config
modules:
  cloudHub:
    advertiseAddress:
    - 10.0.0.5
    dnsNames:
    - hub.example.com
    nodeLimit: 1000
    tlsCAFile: /etc/kubeedge/ca/rootCA.crt
    tlsCAKeyFile: /etc/kubeedge/ca/rootCA.key
    tlsCertFile: /etc/kubeedge/certs/server.crt
    tlsPrivateKeyFile: /etc/kubeedge/certs/server.key
    unixsocket:
      address: unix:///var/lib/kubeedge/kubeedge.sock
      enable: true
    websocket:
      address: 0.0.0.0
      enable: true
      port: 10000
    quic:
      address: 0.0.0.0
      enable: false
      maxIncomingStreams: 10000
      port: 10001
    https:
      address: 0.0.0.0
      enable: true
      port: 10002
  edgeController:
    enable: true
  cloudStream:
    enable: false
"""


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def error(self, text: str) -> ConfigError:
        path = self.write(text)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        message = str(caught.exception)
        self.assertIn(path, message)
        self.assertEqual(len(message.splitlines()), 1, message)
        return caught.exception

    def test_defaults_are_cloudcores(self) -> None:
        """An empty file gives cloudcore's modules.cloudHub defaults (§8.1)."""
        config = load_config(self.write(""))
        hub = config.cloudhub
        self.assertEqual(hub.keepalive_interval, 30)
        self.assertEqual(hub.node_limit, 500)
        self.assertEqual((hub.websocket.enable, hub.websocket.port), (True, 10000))
        self.assertEqual((hub.quic.enable, hub.quic.port), (False, 10001))
        self.assertEqual(hub.quic.max_incoming_streams, 10000)
        self.assertEqual((hub.https.enable, hub.https.port), (True, 10002))
        self.assertEqual(hub.edge_cert_signing_duration, 365)
        self.assertEqual(hub.token_refresh_duration, 12)
        self.assertEqual(config.hub.api.address, "127.0.0.1")
        self.assertEqual(config.hub.api.port, 10350)

    def test_sample_config_loads(self) -> None:
        config = load_config(os.path.join(REPO, "etc", "cloudhub.yaml"))
        self.assertEqual(config.hub.data_dir, "data")
        self.assertEqual(config.store_path, os.path.join("data", "cloudhub.db"))

    def test_whole_cloudcore_yaml(self) -> None:
        """A cloudcore.yaml is read through its modules.cloudHub block; other modules ignored."""
        config = load_config(self.write(CLOUDCORE_YAML))
        self.assertEqual(config.cloudhub.advertise_address, ["10.0.0.5"])
        self.assertEqual(config.cloudhub.dns_names, ["hub.example.com"])
        self.assertEqual(config.cloudhub.node_limit, 1000)

    def test_cloudcore_yaml_bad_key_named_with_its_path(self) -> None:
        error = self.error(CLOUDCORE_YAML.replace("nodeLimit: 1000", "nodeLimits: 1000"))
        self.assertEqual(error.key, "modules.cloudHub.nodeLimits")

    def test_nested_section_keeps_its_own_defaults(self) -> None:
        config = parse_config({"cloudHub": {"https": {"address": "127.0.0.1"}}})
        self.assertEqual(config.cloudhub.https.port, 10002)
        self.assertEqual(config.cloudhub.websocket.port, 10000)

    def test_unknown_key(self) -> None:
        error = self.error("cloudHub:\n  keepaliveIntervall: 30\n")
        self.assertEqual(error.key, "cloudHub.keepaliveIntervall")
        self.assertIn("unknown key", str(error))

    def test_unknown_top_level_key(self) -> None:
        error = self.error("cloudhub:\n  nodeLimit: 3\n")
        self.assertEqual(error.key, "cloudhub")

    def test_wrong_type(self) -> None:
        error = self.error("cloudHub:\n  nodeLimit: lots\n")
        self.assertEqual(error.key, "cloudHub.nodeLimit")
        self.assertIn("integer", str(error))

    def test_boolean_is_not_an_integer(self) -> None:
        error = self.error("cloudHub:\n  websocket:\n    port: true\n")
        self.assertEqual(error.key, "cloudHub.websocket.port")

    def test_section_not_a_mapping(self) -> None:
        error = self.error("hub:\n  api: 10350\n")
        self.assertEqual(error.key, "hub.api")

    def test_out_of_range(self) -> None:
        error = self.error("cloudHub:\n  websocket:\n    port: 70000\n")
        self.assertEqual(error.key, "cloudHub.websocket.port")
        self.assertIn("65535", str(error))

    def test_zero_keepalive_out_of_range(self) -> None:
        error = self.error("cloudHub:\n  keepaliveInterval: 0\n")
        self.assertEqual(error.key, "cloudHub.keepaliveInterval")

    def test_negative_gc_threshold(self) -> None:
        error = self.error("hub:\n  gcThreshold: -1\n")
        self.assertEqual(error.key, "hub.gcThreshold")
        self.assertIn("at least 0", str(error))

    def test_negative_switch_interval(self) -> None:
        error = self.error("hub:\n  switchIntervalMicroseconds: -5\n")
        self.assertEqual(error.key, "hub.switchIntervalMicroseconds")

    def test_bad_ip_address(self) -> None:
        error = self.error("cloudHub:\n  advertiseAddress: [hub.example.com]\n")
        self.assertEqual(error.key, "cloudHub.advertiseAddress")

    def test_bad_choice(self) -> None:
        error = self.error("hub:\n  store:\n    type: redis\n")
        self.assertEqual(error.key, "hub.store.type")

    def test_missing_file(self) -> None:
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("not found", str(caught.exception))

    def test_unreadable_file(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(path, str(caught.exception))

    def test_invalid_yaml(self) -> None:
        error = self.error("cloudHub: [\n")
        self.assertIn("invalid YAML", str(error))

    def test_top_level_not_a_mapping(self) -> None:
        self.error("- 1\n- 2\n")

    def test_as_dict_uses_yaml_names(self) -> None:
        settings = HubConfig().as_dict()
        self.assertEqual(settings["cloudHub"]["websocket"]["port"], 10000)
        self.assertEqual(settings["hub"]["api"]["port"], 10350)
