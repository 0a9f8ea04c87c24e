"""KServe's InferenceRESTClient against a running server's HTTP port: ``python kserve_rest_check.py BASE_URL``.

Run in a process of its own by ``test_http_frontend``: kserve registers its own copy of the v2 protobuf
file under the package ``inference`` in protobuf's default pool, which tritonclient.grpc's copy already
holds in a test process that imported it ("duplicate symbol 'inference.ServerLiveRequest'"). Exits 0 and
prints ``ok`` when every check passed; an assertion error otherwise.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def check(base: str) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        assert await client.is_server_live(base) and await client.is_server_ready(base)
        assert await client.is_model_ready(base, "identity")
        assert not await client.is_model_ready(base, "nope")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for binary in (False, True):  # JSON, then Triton's binary tensors
            tensor = InferInput("INPUT0", [2, 4], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            response = await client.infer(base, InferRequest("identity", [tensor], request_id="k"), "identity")
            np.testing.assert_array_equal(response.outputs[0].as_numpy(), x)
            assert response.id == "k"
        words = np.array([["héllo", "v2"]], dtype=object)
        tensor = InferInput("INPUT0", [1, 2], "BYTES")
        tensor.set_data_from_numpy(words, binary_data=False)
        response = await client.infer(base, InferRequest("text", [tensor]), "text")
        got = [w.decode() if isinstance(w, bytes) else w for w in response.outputs[0].as_numpy().ravel()]
        assert got == ["héllo", "v2"], got
        # a plain dict in the v2 JSON form
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        answer = await client.infer(base, body, "identity")
        assert answer.outputs[0].data == [1.0, 2.0, 3.0, 4.0]
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(check(sys.argv[1]))
    print("ok")
