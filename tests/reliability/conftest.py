"""The reliability tier uses the cluster tier's fixtures (one rig per pytest session, fresh
namespaces, the operator as a ServiceAccount); see tests/cluster/conftest.py."""

from tests.cluster.conftest import cluster, kopf_runner_as, namespace  # noqa: F401
