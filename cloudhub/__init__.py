"""cloudhub: the cloud side of KubeEdge, on Twisted."""

__version__ = "0.1.0"
