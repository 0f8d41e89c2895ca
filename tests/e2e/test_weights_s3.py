"""Weights from an S3 bucket on kind, prefetched into the cache volume: a SeaweedFS server built
from its Go module runs as a pod (llmep/seaweedfs, hack/images), the host uploads the tiny model
to it, and an LLMEndpoint with `cache.prefetch` and an s3:// source shows `DownloadingWeights`
with a moving byte count, then `LoadingModel`, then serves through the gateway; a bucket that does
not exist gives `BackendFailed` naming it.

The store's pod carries `kubernetes.io/egress-bandwidth` (the kind node's CNI has the bandwidth
plugin): on a link as fast as a loopback the copy ends before the operator reads its progress
twice, as it would not from a real bucket. Uploads into the pod are not limited. The kubelet
gives the plugin's token bucket a burst of 512 MiB (`tc qdisc show` on the node), which passes
at once; what comes after it flows at the rate.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pytest_kind import KindCluster

from tests.e2e.kind import Images, llmep_cli, node_address, ready_condition, wait_for

pytestmark = [pytest.mark.timeout(3600)]

NAMESPACE = "weights-s3"
BUCKET = "models"
PREFIX = "tiny-llama"
STORE = "s3-store"
CREDENTIALS_SECRET = "s3-credentials"  # noqa: S105 - the Secret's name
ENDPOINT = "s3-tiny"
WRONG_BUCKET_ENDPOINT = "s3-no-bucket"
MISSING_BUCKET = "no-such-bucket"
KEY_NAME = "e2e-weights-s3"
HOST_CACHE_ROOT = "/var/local/llmep-weights-s3"  # in the kind node: the cache volumes' host paths
# A file the engine does not read (not *.safetensors, *.bin or *.pt) that makes the copy last
# ~35 s: 512 MiB of burst, then 288 MiB at the store's egress bandwidth, long enough for several
# progress reads (the operator looks every 5 s while weights download).
PADDING_BYTES = 800 * 1024 * 1024
STORE_EGRESS_BANDWIDTH = "64M"  # bits/s: 8 MB/s
# The store takes requests signed with any key while it has no identities configured.
ACCESS_KEY, SECRET_KEY, REGION = "llmep-e2e", "llmep-e2e-secret", "us-east-1"  # noqa: S105


def store_manifests(image: str) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {STORE}
  namespace: {NAMESPACE}
  labels: {{app: {STORE}}}
  annotations: {{kubernetes.io/egress-bandwidth: {STORE_EGRESS_BANDWIDTH}}}
spec:
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    seccompProfile: {{type: RuntimeDefault}}
  containers:
    - name: weed
      image: {image}
      imagePullPolicy: Never
      workingDir: /data
      # Master, volume server, filer and S3 gateway in one process; the other servers reach
      # each other on loopback, the S3 port answers the Service.
      args: [server, -dir=/data, -ip=127.0.0.1, -ip.bind=0.0.0.0, -s3, -s3.port=8333,
             -s3.port.iceberg=0, -s3.port.lance=0, -master.telemetry=false, -volume.preStopSeconds=0]
      ports: [{{containerPort: 8333, name: s3}}]
      readinessProbe: {{tcpSocket: {{port: 8333}}, periodSeconds: 2}}
      resources:
        requests: {{cpu: 10m, memory: 256Mi}}
        limits: {{memory: 1Gi}}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {{drop: [ALL]}}
      volumeMounts: [{{name: data, mountPath: /data}}, {{name: tmp, mountPath: /tmp}}]
  volumes:
    - {{name: data, emptyDir: {{sizeLimit: 2Gi}}}}
    - {{name: tmp, emptyDir: {{sizeLimit: 256Mi}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {STORE}, namespace: {NAMESPACE}}}
spec:
  type: NodePort
  selector: {{app: {STORE}}}
  ports: [{{name: s3, port: 8333, targetPort: s3}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: {CREDENTIALS_SECRET}, namespace: {NAMESPACE}}}
stringData:
  AWS_ACCESS_KEY_ID: {ACCESS_KEY}
  AWS_SECRET_ACCESS_KEY: {SECRET_KEY}
  AWS_REGION: {REGION}
  AWS_ENDPOINT_URL: http://{STORE}.{NAMESPACE}.svc:8333
"""


def cache_volume(endpoint: str) -> str:
    """A host-path PersistentVolume for the endpoint's cache PVC (a one-node kind cluster has no
    provisioner; on a real cluster cache.storageClassName names one with ReadWriteMany)."""
    return f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {NAMESPACE}-{endpoint}}}
spec:
  capacity: {{storage: 2Gi}}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {NAMESPACE}-{endpoint}
  hostPath: {{path: {HOST_CACHE_ROOT}/{endpoint}, type: Directory}}
"""


def endpoint_manifest(name: str, source: str) -> str:
    return f"""
apiVersion: llmep.io/v1alpha1
kind: LLMEndpoint
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  model: {{source: "{source}", servedName: {name}}}
  storageSecretRef: {{name: {CREDENTIALS_SECRET}}}
  cache: {{enabled: true, size: 2Gi, prefetch: true, storageClassName: {NAMESPACE}-{name}}}
  engine: {{maxModelLen: 256, dtype: float32}}
  resources: {{profile: cpu}}
  autoscaling: {{minReplicas: 1, maxReplicas: 1}}
"""


class Zeros(io.RawIOBase):
    """`size` zero bytes as a readable stream, for an upload that needs no file on disk."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


@dataclass(frozen=True)
class Store:
    uploaded_bytes: int


def docker_exec_on_node(cluster: KindCluster, *command: str) -> None:
    """Run `command` in the kind node's container (the node's name is its container's)."""
    node = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"][0]["metadata"]["name"]
    subprocess.run([shutil.which("docker") or "docker", "exec", node, *command], check=True, timeout=120)


def s3_client(cluster: KindCluster):
    import boto3
    from botocore.config import Config

    service = json.loads(cluster.kubectl("get", "service", STORE, "-n", NAMESPACE, "-o", "json"))
    url = f"http://{node_address(cluster)}:{service['spec']['ports'][0]['nodePort']}"
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(connect_timeout=5, read_timeout=120, retries={"max_attempts": 3}),
    )


def writes_work(client) -> bool:  # type: ignore[no-untyped-def]
    """Whether the store takes a bucket and an object yet (the first write waits on volume ids)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket=BUCKET)
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
    except BotoCoreError:
        return False
    try:
        client.put_object(Bucket=BUCKET, Key="ready-probe", Body=b"ready")
        client.delete_object(Bucket=BUCKET, Key="ready-probe")
    except (BotoCoreError, ClientError):
        return False
    return True


@pytest.fixture(scope="module")
def store(kind_cluster: KindCluster, llmep_release: str, images: Images) -> Iterator[Store]:
    """The store's pod, the credentials' Secret and a cache volume per endpoint; the tiny model
    and the padding uploaded from the host. Removed afterwards, endpoints first."""
    from llmep_serving.tinymodel import ensure_tiny_model

    kind_cluster.kubectl("apply", "-f", "-", input=store_manifests(images.seaweedfs))
    for endpoint in (ENDPOINT, WRONG_BUCKET_ENDPOINT):
        # The cache volumes' folders, writable by the Ray pods' uid as a provisioner's would be.
        docker_exec_on_node(kind_cluster, "install", "-d", "-o", "1000", "-g", "1000", f"{HOST_CACHE_ROOT}/{endpoint}")
        kind_cluster.kubectl("apply", "-f", "-", input=cache_volume(endpoint))
    try:
        kind_cluster.kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", f"pod/{STORE}", "--timeout=300s")
        client = s3_client(kind_cluster)
        wait_for("the store to take writes", lambda: writes_work(client), timeout=120, interval=1)
        t0 = time.monotonic()
        model = ensure_tiny_model()
        uploaded = 0
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(model).as_posix()}")
            uploaded += path.stat().st_size
        client.upload_fileobj(io.BufferedReader(Zeros(PADDING_BYTES), 1 << 20), BUCKET, f"{PREFIX}/padding.dat")
        uploaded += PADDING_BYTES
        print(f"\n[e2e] uploaded {uploaded / 2**20:.0f} MiB to s3://{BUCKET}/{PREFIX} in {time.monotonic() - t0:.1f}s")
        yield Store(uploaded_bytes=uploaded)
    finally:
        llmep_cli(kind_cluster, "keys", "revoke", KEY_NAME, "-n", llmep_release)
        kind_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=600s")
        for endpoint in (ENDPOINT, WRONG_BUCKET_ENDPOINT):
            kind_cluster.kubectl("delete", "pv", f"{NAMESPACE}-{endpoint}", "--ignore-not-found", "--wait=true")
        docker_exec_on_node(kind_cluster, "rm", "-rf", HOST_CACHE_ROOT)


def test_a_bucket_that_does_not_exist_fails_naming_it(kind_cluster: KindCluster, store: Store):
    source = f"s3://{MISSING_BUCKET}/{PREFIX}"
    kind_cluster.kubectl("apply", "-f", "-", input=endpoint_manifest(WRONG_BUCKET_ENDPOINT, source))
    t0 = time.monotonic()

    def failed():
        ready = ready_condition(kind_cluster, WRONG_BUCKET_ENDPOINT, NAMESPACE)
        return ready if ready.get("reason") == "BackendFailed" else None

    ready = wait_for("Ready reason BackendFailed", failed, timeout=600, interval=2)
    print(f"\n[e2e] wrong bucket: {ready['reason']} after {time.monotonic() - t0:.0f}s: {ready['message']}")
    assert ready["status"] == "False"
    assert ready["message"] == (
        f"filling the cache failed: bucket {MISSING_BUCKET!r} does not exist ({source}): check spec.model.source"
    )
    # Nothing is started for a fill that failed.
    assert not kind_cluster.kubectl("get", "rayservices", "-n", NAMESPACE, "-o", "name").split()
    kind_cluster.kubectl("delete", "llmendpoint", WRONG_BUCKET_ENDPOINT, "-n", NAMESPACE, "--wait=true")


DOWNLOADING = re.compile(r"^downloading weights into the cache: (\d+\.\d) of (\d+\.\d) GiB(, \d+ MiB/s)?")


@pytest.fixture(scope="module")
def ready_history(kind_cluster: KindCluster, store: Store) -> dict:
    """Apply the endpoint and record each (status, reason, message) of its Ready condition until
    it is True, and `llmep status` once while the download reports its progress."""
    kind_cluster.kubectl("apply", "-f", "-", input=endpoint_manifest(ENDPOINT, f"s3://{BUCKET}/{PREFIX}"))
    t0 = time.monotonic()
    seen: list[tuple[str, str, str, float]] = []
    cli_during_download = ""
    deadline = t0 + 1500
    while not seen or seen[-1][0] != "True":
        assert time.monotonic() < deadline, f"not Ready after 1500 s; Ready went through {seen}"
        ready = ready_condition(kind_cluster, ENDPOINT, NAMESPACE)
        state = (ready.get("status", ""), ready.get("reason", ""), ready.get("message", ""))
        if ready and (not seen or seen[-1][:3] != state):
            seen.append((*state, round(time.monotonic() - t0, 1)))
            print(f"[e2e] {seen[-1][3]:6.1f}s Ready={state[0]} {state[1]}: {state[2]}")
            if DOWNLOADING.match(state[2]) and not cli_during_download:
                cli_during_download = llmep_cli(kind_cluster, "status", "-n", NAMESPACE).stdout
        time.sleep(0.5)
    return {"seen": seen, "cli": cli_during_download}


def test_s3_weights_show_a_moving_byte_count_then_load_then_serve(
    kind_cluster: KindCluster, store: Store, ready_history: dict
):
    seen = ready_history["seen"]
    reasons = [reason for _, reason, _, _ in seen]
    downloading = [message for _, reason, message, _ in seen if reason == "DownloadingWeights"]
    progress = [m for message in downloading if (m := DOWNLOADING.match(message))]
    done = [float(m.group(1)) for m in progress]
    assert len(set(done)) >= 2, f"the byte count did not move: {downloading}"
    assert done == sorted(done), downloading
    assert {m.group(2) for m in progress} == {f"{store.uploaded_bytes / 2**30:.1f}"}, downloading
    assert "LoadingModel" in reasons, reasons
    assert reasons.index("LoadingModel") > max(i for i, r in enumerate(reasons) if r == "DownloadingWeights"), reasons
    assert seen[-1][0] == "True"
    cli = ready_history["cli"]
    assert f"{NAMESPACE}/{ENDPOINT}" in cli and "DownloadingWeights" in cli and " GiB" in cli, cli
    # The replicas read the copy on the cache volume, not the bucket.
    rayservice = json.loads(kind_cluster.kubectl("get", "rayservice", ENDPOINT, "-n", NAMESPACE, "-o", "json"))
    serve_config = rayservice["spec"]["serveConfigV2"]
    assert "/home/ray/.cache/huggingface/" in serve_config and "s3://" not in serve_config, serve_config


def test_the_s3_endpoint_answers_through_the_gateway(
    kind_cluster: KindCluster, ready_history: dict, gateway_url: str, llmep_release: str
):
    from openai import OpenAI

    made = llmep_cli(kind_cluster, "keys", "create", KEY_NAME, "-n", llmep_release, "--models", ENDPOINT)
    assert made.returncode == 0, made.stderr
    client = OpenAI(base_url=gateway_url, api_key=made.stdout.strip(), timeout=120, max_retries=0)

    def listed():
        import openai

        try:
            return [m.id for m in client.models.list().data]
        except openai.AuthenticationError:
            return None  # the gateway has not loaded the new key yet

    models = wait_for("the new key to list the endpoint's model", listed, timeout=60, interval=0.5)
    assert models == [ENDPOINT]
    chat = client.chat.completions.create(
        model=ENDPOINT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    print(f"\n[e2e] {ENDPOINT} says: {chat.choices[0].message.content!r}")
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens > 0
