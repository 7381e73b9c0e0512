"""The edge side in Python: what edgecore does, for tests, the simulator and edge agents.

``bootstrap``  the first certificate with a join token, renewal, saving and loading.
"""
