from twisted.application.service import ServiceMaker

cloudhub = ServiceMaker(
    "cloudhub",
    "cloudhub.tap",
    "The cloud side of KubeEdge: certificates, WebSocket/QUIC edge hub, reliable delivery",
    "cloudhub",
)
