"""tritonclient and tensorwire.client in one process, against one server (our messages
live in package tensorwire.v2, so both import).

tritonclient registers package ``inference`` messages in protobuf's default pool;
ours live in ``tensorwire.v2``. Importing tritonclient first and then the SDK,
and using both, shows that the SDK neither clashes with nor depends on it.
"""

from __future__ import annotations

import numpy as np
import pytest

tritongrpc = pytest.importorskip("tritonclient.grpc")

from client_models import small_repo  # noqa: E402
from serving import running_server  # noqa: E402

from tensorwire.client import InferenceClient, ModelNotFoundError  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = small_repo(tmp_path_factory.mktemp("interop") / "models")
    with running_server(repo, "--drain-seconds", "0") as running:
        yield running


def test_both_clients_in_one_process(server):
    data = np.arange(32, dtype=np.float32).reshape(2, 16)
    triton = tritongrpc.InferenceServerClient(url=server.address)
    tensor = tritongrpc.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    theirs = triton.infer("identity", [tensor]).as_numpy("OUTPUT0")
    with InferenceClient(server.address) as client:
        ours = client.infer("identity", {"INPUT0": data})["OUTPUT0"]
        metadata = client.model_metadata("identity")
        assert metadata.inputs[0].name == triton.get_model_metadata("identity").inputs[0].name
        with pytest.raises(ModelNotFoundError):
            client.infer("absent", {"INPUT0": data})
    triton.close()
    assert np.array_equal(theirs, data) and np.array_equal(ours, data)
