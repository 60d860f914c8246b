"""The server's OpenAPI document, fuzzed by schemathesis against a real uvicorn server.

Every operation gets schema-valid and schema-violating requests (a bounded, derandomized number:
the run is the same every time); every response must be documented (status, content type,
headers, body schema) and none may be a 500. Two of schemathesis' default checks are replaced,
with the reason:

* ``positive_data_acceptance`` (a schema-valid body must be taken): JSON Schema cannot state the
  rules between fields (nfe or num_steps, churn only on Euler/Heun, a class only on a
  conditional model), so a valid-looking body may rightly get the library's 400;
* ``not_a_server_error`` (no 5xx): 503 (queue full, draining) and 504 (past the request's own
  timeout, which a fuzzer sets to 5e-324 s) are documented answers; `no_internal_error` keeps
  the point of the check: never a 500.
"""

from __future__ import annotations

import pytest

from tests.conftest import has_module, requires_onnx

pytestmark = [requires_onnx, pytest.mark.skipif(
    not (has_module("schemathesis") and has_module("uvicorn") and has_module("fastapi")),
    reason="schemathesis (the dev extra) and the serve extra are needed")]

EXAMPLES_PER_OPERATION = 60


def test_every_response_the_fuzzer_provokes_is_documented_and_none_is_a_500(tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    from edm_deploy.loading import load
    from edm_deploy.runtime.engine import Engine
    from tests.live_server import live_server
    from tests.onnx_oracles import gaussian_onnx

    @schemathesis.check
    def no_internal_error(ctx, response, case):
        if response.status_code == 500 or response.status_code > 504:
            raise AssertionError(f"{response.status_code} {response.text[:300]}")

    checks = dict(excluded_checks=[schemathesis.checks.positive_data_acceptance, schemathesis.checks.not_a_server_error],
                  additional_checks=[no_internal_error])
    model = gaussian_onnx(str(tmp_path / "g.onnx"), label_dim=4)
    with load(model) as den, live_server(Engine(den, max_batch=16, max_images=8, max_queue=8)) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} == {"GET /healthz", "GET /v1/model", "GET /metrics", "POST /v1/generate"}
        for operation in operations:
            takes_body = operation.label.startswith("POST")  # a GET has nothing a negative case could break
            for mode in [schemathesis.GenerationMode.POSITIVE] + [schemathesis.GenerationMode.NEGATIVE] * takes_body:
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    case.call_and_validate(**checks)

                fuzz()
