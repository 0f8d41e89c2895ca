"""The reliability tier uses the cluster tier's fixtures (one rig per pytest session, fresh
namespaces, the operator as a ServiceAccount); see tests/cluster/conftest.py."""

from tests.cluster.conftest import chart_operator, cluster, crd, kopf_runner_as, namespace  # noqa: F401
