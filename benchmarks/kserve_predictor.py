"""KServe's own model server (``kserve.ModelServer``: REST and gRPC v2) wrapping the toolkit's model: the
same ``load_model`` and ``OrtRunner`` as ``serve``, the same input checks (``ServedModel.check``), as a
KServe custom predictor. ``benchmarks/run_grpc.py`` measures it beside ``serve``.

    python benchmarks/kserve_predictor.py ARTIFACT_DIR --http-port 8080 --grpc-port 8081

Run it in its own process: ``kserve`` registers the v2 protos under the same names as
``tritonclient.grpc`` ("duplicate symbol 'inference.ServerLiveRequest'"), so no process may import both;
nothing imported here pulls in tritonclient.grpc. ``predict`` is synchronous, the usual custom-predictor
form: KServe calls it on its event loop, one request at a time, with no micro-batching. Per-request logging
is turned down to warnings (KServe logs every call at INFO by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(artifact_dir: Path) -> Any:
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput

    from serving.protocol import InferRequest as OurRequest
    from serving.protocol import RequestError, datatype_of
    from serving.served import ServeConfig, load_model

    served = load_model(ServeConfig(artifact_dir=artifact_dir, max_batch=1, threads=1, ort_spinning=False))

    class OrtPredictor(kserve.Model):
        def __init__(self) -> None:
            super().__init__(served.name)
            self.ready = True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            req = OurRequest(inputs={i.name: i.as_numpy() for i in payload.inputs},
                             datatypes={i.name: i.datatype for i in payload.inputs})
            try:
                feed = served.check(req)
            except RequestError as exc:
                raise InvalidInput(exc.message) from None
            outputs = []
            for name, arr in zip(served.spec.output_names, served.runner.infer(feed), strict=True):
                out = InferOutput(name=name, shape=list(arr.shape), datatype=datatype_of(arr.dtype))
                out.set_data_from_numpy(arr, binary_data=True)
                outputs.append(out)
            return InferResponse(response_id=payload.id or "", model_name=served.name, infer_outputs=outputs,
                                 model_version="1")

    return OrtPredictor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("artifact_dir", type=Path)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--grpc-port", type=int, default=8081)
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses the command line when imported
    import kserve

    model = build_model(args.artifact_dir)
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                                enable_latency_logging=False)
    # No per-request log lines (KServe logs every gRPC call and HTTP request at INFO by default; `serve` logs
    # none): the comparison is of the serving paths, not of logging.
    for name in ("kserve", "kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
