"""Embed cloudhub in your own Twisted application: ``twistd -n -y examples/embed.tac``.

Sends every connecting node a ConfigMap and prints what nodes send up.
"""

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import Logger

from cloudhub.config import load_config
from cloudhub.model import Message
from cloudhub.service import CloudHubService

log = Logger()
application = service.Application("my-edge-app")
hub = CloudHubService(load_config("etc/cloudhub.yaml"), reactor=reactor)
hub.setServiceParent(application)


def on_node_event(event):
    if event.event != "connected":
        return
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "app", "namespace": "default", "uid": "cm-app-1",
                     "resourceVersion": "1"},
        "data": {"greeting": "hello"},
    }
    message = Message.new("edgecontroller", "resource", "insert", "default/configmap/app",
                          configmap, resource_version="1")
    delivered = hub.upstream.send(event.node_id, message)
    delivered.addCallbacks(
        lambda m: log.info("node {node} acknowledged {msg_id}", node=event.node_id, msg_id=m.msg_id),
        lambda f: log.info("not delivered to {node}: {why}", node=event.node_id,
                           why=f.getErrorMessage()),
    )


hub.upstream.subscribe_events(on_node_event)
hub.upstream.subscribe(
    lambda node, msg: log.info("{node} sent {op} {resource}", node=node, op=msg.operation,
                               resource=msg.resource)
)
