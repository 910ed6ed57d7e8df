"""Hand-off to deployment: a Triton model repository (``package``/``verify``), a KServe v2 HTTP server
(``serve``) and a load generator (``loadtest``).

Heavy imports (tritonclient's protobuf schema, FastAPI, onnxruntime, aiohttp) happen inside the
functions that need them, so ``import serving`` is cheap.
"""
