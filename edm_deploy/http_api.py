"""The HTTP API's words: the generate body declared once, its checks, and every response's schema.

A field of ``POST /v1/generate`` is one `GenerateRequest` field (its doc, JSON schema, check,
and whether the engine takes it under the same name); the sampler options are
`SamplerSettings`' fields. The body's parser, the OpenAPI schema, the list of known names and
the call into the engine are derived from these two declarations, so a new field is one place.

Every limit is checked before the work it bounds: a seed range is counted before it is
expanded, the number of time points before a plan is made, the grid's pixels before it is drawn.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edm_deploy.runtime.core.errors import InputError, check_int, check_number
from edm_deploy.runtime.sampling.settings import ALIASES, SETTING_NAMES, SamplerSettings

FORMATS = ("png", "grid", "npz", "json")
MEDIA_TYPES = {"png": "image/png", "grid": "image/png", "npz": "application/octet-stream", "json": "application/json"}
MAX_BODY_BYTES = 1 << 20
MAX_GRID_SCALE = 16
DEFAULT_MAX_STEPS = 1000          # time points (num_steps, nfe, len(sigmas)) one request may ask for
DEFAULT_REQUEST_TIMEOUT = 300.0   # seconds: the default and the longest `timeout` of a request
DEFAULT_BODY_TIMEOUT = 30.0       # seconds for a whole request body to arrive
GRID_OPTIONS = ("grid_cols", "grid_scale")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (reported in ``/v1/model``)."""

    max_images: int
    img_resolution: int
    max_steps: int = DEFAULT_MAX_STEPS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_body_bytes: int = MAX_BODY_BYTES


def too_many_images(count: int, limits: Limits) -> InputError:
    return InputError(f"a request may ask for at most {limits.max_images} images, got {count:,}", param="seeds")


# ------------------------------------------------------------------------------------------------
# The checks of the body's own fields (the sampler options are checked by SamplerSettings)


def _seeds(value: Any, limits: Limits) -> Any:
    """A list or the CLI's text form, counted against the image limit before anything is expanded."""
    from edm_deploy.runtime.sampling.seeds import check_seeds, parse_seeds, seed_ranges

    if value is None:
        return None
    if isinstance(value, str):
        count = sum(hi - lo + 1 for lo, hi in seed_ranges(value))
        if count > limits.max_images:
            raise too_many_images(count, limits)
        return parse_seeds(value)
    if isinstance(value, list) and len(value) > limits.max_images:
        raise too_many_images(len(value), limits)
    return check_seeds(value)


def _count(value: Any, limits: Limits) -> Optional[int]:
    if value is None:
        return None
    n = check_int(value, "n", lo=1)
    if n > limits.max_images:
        raise too_many_images(n, limits)
    return n


def _timeout(value: Any, limits: Limits) -> float:
    if value is None:
        return limits.request_timeout
    seconds = check_number(value, "timeout")
    if not 0 < seconds <= limits.request_timeout:
        raise InputError(f"timeout must be more than 0 and at most {limits.request_timeout:g} s on this server, got "
                         f"{seconds:g}", param="timeout")
    return seconds


def _format(value: Any, limits: Limits) -> Optional[str]:
    if value is not None and value not in FORMATS:
        raise InputError(f"unknown format {value!r}; choose one of {', '.join(FORMATS)}", param="format")
    return value


def _interval(value: Any, limits: Limits) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _stream(value: Any, limits: Limits) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"stream must be true or false, got {value!r}", param="stream")
    return value


def _grid_scale(value: Any, limits: Limits) -> Optional[int]:
    return None if value is None else check_int(value, "grid_scale", 1, MAX_GRID_SCALE)


def _grid_cols(value: Any, limits: Limits) -> Optional[int]:
    return None if value is None else check_int(value, "grid_cols", lo=1)


def _field(doc: str, schema: dict, check: Optional[Callable[[Any, Limits], Any]] = None, *,
           engine: bool = False) -> Any:
    """One body field: `doc`, its JSON `schema`, `check(value, limits)`; `engine`: passed to the engine by name."""
    return field(default=None, metadata=dict(doc=doc, schema=schema, check=check, engine=engine))


_INT_LIST = {"type": "array", "items": {"type": "integer", "minimum": 0}}


@dataclass(frozen=True)
class GenerateRequest:
    """The ``POST /v1/generate`` body beyond the sampler options, checked; ``settings`` holds those."""

    seeds: Any = _field("Seeds: a list of integers in [0, 2^32) or the CLI's text form '0-7,10' [default: [0]]",
                        {"anyOf": [_INT_LIST, {"type": "string", "pattern": r"^[0-9, -]+$"}]}, _seeds, engine=True)
    n: Optional[int] = _field("Seeds 0..n-1 instead of seeds", {"type": "integer", "minimum": 1}, _count)
    class_idx: Any = _field("One class for all images, or a list with one class per seed [default: random per seed]",
                            {"anyOf": [{"type": "integer", "minimum": 0}, _INT_LIST]}, engine=True)
    guidance: Optional[float] = _field("Guidance weight W: D = D_g + W (D - D_g), by the server's guide model or, "
                                       "without one, classifier-free", {"type": "number"}, engine=True)
    guidance_interval: Any = _field("Guide only for lo < sigma <= hi", {"type": "array", "items": {"type": "number"},
                                                                       "minItems": 2, "maxItems": 2},
                                    _interval, engine=True)
    timeout: Optional[float] = _field("Seconds from arrival; a request still running then gets a 504 [default and "
                                      "most: the server's request_timeout in /v1/model limits]",
                                      {"type": "number", "exclusiveMinimum": 0}, _timeout, engine=True)
    priority: Optional[int] = _field("Admission priority, -10 to 10, higher sooner, for a scheduler that reads it "
                                     "(deadline; scheduler in /v1/model) [default: 0]",
                                     {"type": "integer", "minimum": -10, "maximum": 10}, engine=True)
    deadline: Optional[float] = _field("Seconds from arrival by which the images are wanted: the deadline scheduler "
                                       "admits the earliest first (a hint; unlike timeout the request is not dropped "
                                       "after it)", {"type": "number", "exclusiveMinimum": 0}, engine=True)
    stream: Optional[bool] = _field("Answer as NDJSON lines (application/x-ndjson): the previews as they come, then "
                                    "the result (format json's body) or an error line", {"type": "boolean"}, _stream)
    preview_every: Optional[int] = _field("With stream: a preview line (the denoised estimate as PNG) every that many "
                                          "solver steps", {"type": "integer", "minimum": 1}, engine=True)
    format: Optional[str] = _field("png (one image), grid, npz or json [default: png for one image, else json]",
                                   {"type": "string", "enum": list(FORMATS)}, _format)
    grid_cols: Optional[int] = _field("Grid width in images (format grid)", {"type": "integer", "minimum": 1}, _grid_cols)
    grid_scale: Optional[int] = _field(f"Grid pixels per image pixel, 1..{MAX_GRID_SCALE} (format grid)",
                                       {"type": "integer", "minimum": 1, "maximum": MAX_GRID_SCALE}, _grid_scale)
    settings: SamplerSettings = field(default_factory=SamplerSettings, metadata=dict(body=False))

    def engine_args(self) -> dict[str, Any]:
        """The engine's request, by name: every field marked `engine`, and the settings."""
        args = {f.name: getattr(self, f.name) for f in BODY_FIELDS if f.metadata["engine"]}
        return {**args, "settings": self.settings}

    @property
    def count(self) -> int:
        return len(self.seeds)


BODY_FIELDS = tuple(f for f in dataclasses.fields(GenerateRequest) if f.metadata.get("body", True))
REQUEST_FIELDS = tuple(f.name for f in BODY_FIELDS)


def parse_generate(body: Any, limits: Limits) -> GenerateRequest:
    """The body checked by the library's own functions; anything wrong is one InputError in the API's words."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    unknown = [k for k in body if k not in REQUEST_FIELDS and k not in SETTING_NAMES]
    if unknown:
        meant = ALIASES.get(unknown[0])
        hint = f" (the API calls it {meant})" if meant else ""
        raise InputError(f"unknown field {unknown[0]!r}{hint}; the fields are "
                         f"{', '.join(sorted(REQUEST_FIELDS + SETTING_NAMES))}", param=unknown[0])
    if body.get("seeds") is not None and body.get("n") is not None:
        raise InputError("give seeds or n, not both", param=("seeds", "n"))
    values = {f.name: f.metadata["check"](body.get(f.name), limits) if f.metadata["check"] else body.get(f.name)
              for f in BODY_FIELDS}
    n = values.pop("n")
    if values["seeds"] is None:
        values["seeds"] = list(range(n)) if n is not None else [0]
    settings = SamplerSettings.from_options(**{k: body[k] for k in SETTING_NAMES if k in body})
    check_work(settings, limits)
    call = GenerateRequest(**values, n=n, settings=settings)
    return _check_output(call, limits)


def check_work(settings: SamplerSettings, limits: Limits) -> None:
    """The time points a request asks for, bounded before a plan is made (the NFE follows from them)."""
    points = None if settings.sigmas is None else len(settings.sigmas) - (settings.sigmas[-1] == 0)
    for name, value in (("num_steps", settings.num_steps), ("nfe", settings.nfe), ("sigmas", points)):
        if value is not None and value > limits.max_steps:
            asked = f"sigmas holds {value:,} time points" if name == "sigmas" else f"{name} {value:,}"
            raise InputError(f"{asked} is more than this server takes per request (at most {limits.max_steps:,}: "
                             "max_steps in /v1/model limits)", param=name)


def _check_output(call: GenerateRequest, limits: Limits) -> GenerateRequest:
    """The format against the image count, grid options only for grids, the grid's size bounded; a stream is JSON."""
    from edm_deploy.runtime.output.writers import GridWriter, grid_size

    if call.preview_every is not None and not call.stream:
        raise InputError("preview_every needs stream: true (the previews come as lines of a stream)",
                         param="preview_every")
    if call.stream and call.format not in (None, "json"):
        raise InputError(f"a stream answers in JSON lines; format {call.format} applies without stream", param="format")
    fmt = call.format or ("png" if call.count == 1 and not call.stream else "json")
    if fmt == "png" and call.count != 1:
        raise InputError(f"format png holds one image; {call.count} seeds were given (use grid, npz or json)",
                         param="format")
    given = [name for name in GRID_OPTIONS if getattr(call, name) is not None]
    if given and fmt != "grid":
        raise InputError(f"{given[0]} applies to format grid, not {fmt}", param=given[0])
    if fmt == "grid":
        if call.grid_cols is not None and call.grid_cols > call.count:
            raise InputError(f"grid_cols must lie in [1, {call.count}] for {call.count} images, got {call.grid_cols}",
                             param="grid_cols")
        scale = call.grid_scale or 1
        side = max(grid_size(call.count, (limits.img_resolution,) * 2, call.grid_cols)) * scale
        if side > GridWriter.MAX_SIDE:
            raise InputError(f"grid_scale {scale} makes a grid {side} px a side; at most {GridWriter.MAX_SIDE}",
                             param="grid_scale")
    return dataclasses.replace(call, format=fmt)


# ------------------------------------------------------------------------------------------------
# The API's words


_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def api_words(text: str) -> str:
    """Library text that names a sampler's command-line flag (``--solver consistency``), in the API's names.

    The reverse of the CLI's renaming (`cli.cli_message`): the flags `sample` takes for a field of
    the request become that field's name; other flags (a command to run offline) stay.
    """
    return _FLAG.sub(lambda m: _api_names().get(m.group(0), m.group(0)), text)


def _api_names() -> dict[str, str]:
    global _API_NAMES
    if _API_NAMES is None:
        from edm_deploy.cli import flags_of
        from edm_deploy.commands.sample import sample

        known = set(REQUEST_FIELDS) | set(SETTING_NAMES)
        _API_NAMES = {flag: name for name, flag in flags_of(sample).items() if name in known and flag.startswith("--")}
    return _API_NAMES


_API_NAMES: Optional[dict[str, str]] = None


# ------------------------------------------------------------------------------------------------
# Schemas (OpenAPI 3.1, JSON Schema)


def request_schema() -> dict:
    """The generate body's JSON schema: the body fields' and the sampler settings' own metadata."""
    props: dict[str, Any] = {f.name: {**_nullable(f.metadata["schema"]), "description": f.metadata["doc"] + "."}
                             for f in BODY_FIELDS}
    types = {"int": {"type": "integer"}, "float": {"type": "number"}, "flag": {"type": "boolean"},
             "sigmas": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2}}
    for f in dataclasses.fields(SamplerSettings):
        meta = f.metadata
        entry = dict(types.get(meta["kind"], {"type": "string"}))
        if meta["kind"] == "choice":
            entry["enum"] = list(meta["choices"])
        if meta["kind"] in ("int", "float"):
            if meta["lo"] is not None:
                entry["exclusiveMinimum" if meta["lo_open"] else "minimum"] = meta["lo"]
            if meta["hi"] is not None:
                entry["maximum"] = meta["hi"]
        if meta["kind"] == "sigmas":
            entry["examples"] = [[80.0, 10.0, 1.0, 0.002]]
        entry["description"] = meta["doc"] + "."
        props[f.name] = _nullable(entry)
    return {"type": "object", "properties": props, "additionalProperties": False,
            "examples": [{"seeds": [0, 1, 2, 3], "solver": "ipndm", "nfe": 5, "format": "json"}]}


def _nullable(schema: dict) -> dict:
    """Every body field may be null: the same as leaving it out (its default)."""
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    out = {**schema, "type": [schema["type"], "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


ERROR_SCHEMA = {"type": "object", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {"type": "string", "description": "What is wrong, in one line."}}}
RETRY_AFTER = {"Retry-After": {"description": "Seconds after which a retry is likely to be taken.", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}
BINARY = {"type": "string", "format": "binary"}
RESULT_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["seeds", "labels", "images", "solver", "nfe", "seconds", "queued_seconds", "run_seconds", "warnings"],
    "properties": {
        "seeds": {"type": "array", "items": {"type": "integer"}},
        "labels": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}],
                   "description": "The class of each image (null for an unconditional model)."},
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64",
                                              "contentMediaType": "image/png"}},
        "solver": {"type": "string"}, "nfe": {"type": "integer"},
        "seconds": {"type": "number"}, "queued_seconds": {"type": "number"}, "run_seconds": {"type": "number"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "Why these settings give poor images on this model."},
    },
}
RESULT_HEADERS = {
    "X-Seconds": {"description": "Arrival to the last image, in seconds (every answer but a stream).",
                  "schema": {"type": "string"}},
    "X-NFE": {"description": "Network evaluations per image (every answer but a stream).", "schema": {"type": "string"}},
    "X-Solver": {"description": "The solver that ran (every answer but a stream).", "schema": {"type": "string"}},
    "X-Seeds": {"description": "The seeds, comma-separated, in image order (every answer but a stream).",
                "schema": {"type": "string"}},
    "X-Warning": {"description": "Why these settings give poor images on this model ('|'-separated).",
                  "schema": {"type": "string"}},
}
ERRORS = {
    400: "A bad request: one line saying what is wrong, naming the field.",
    404: "No such path.",
    405: "The path does not take this method.",
    408: "The request body did not arrive in time.",
    413: "The request body is larger than the limit.",
    415: "The request body is not application/json.",
    500: "A failure of the model or the server (not of the request).",
    503: "The queue is full, the server is draining, or it stopped before the request finished; retry after "
         "Retry-After seconds (on another replica).",
    504: "The request ran past its timeout.",
}


def error_response(status: int) -> dict:
    """The OpenAPI response of an error status: the one error body, and Retry-After where it is sent."""
    out: dict[str, Any] = {"description": ERRORS[status],
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status == 503:
        out["headers"] = RETRY_AFTER
    return out


def generate_responses() -> dict:
    ok = {"description": "The images in the format asked for (X-* headers say how they were made); with stream, "
                         "NDJSON lines: {\"preview\": {step, steps, sigma, seeds, index, images}} as they come, then "
                         "{\"result\": GenerateResult} or {\"error\": ..., \"status\": ...} (no X-* headers: the "
                         "status line is sent before the outcome is known).",
          "headers": RESULT_HEADERS,
          "content": {"image/png": {"schema": BINARY}, "application/octet-stream": {"schema": BINARY},
                      "application/json": {"schema": {"$ref": "#/components/schemas/GenerateResult"}},
                      "application/x-ndjson": {"schema": {"type": "string"}}}}
    return {200: ok, **{s: error_response(s) for s in (400, 405, 408, 413, 415, 500, 503, 504)}}


def get_responses(ok_description: str, ok_content: dict, *extra: int) -> dict:
    return {200: {"description": ok_description, "content": ok_content},
            **{s: error_response(s) for s in (405, *extra)}}


HEALTH_SCHEMA = {"type": "object", "required": ["status", "queue_length"], "additionalProperties": False,
                 "properties": {"status": {"type": "string", "enum": ["ok"]},
                                "queue_length": {"type": "integer", "minimum": 0}}}

MODEL_SCHEMA = {
    "type": "object",
    "required": ["model", "img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max",
                 "model_sigma_min", "model_sigma_max", "solvers", "limits", "guidance", "scheduler", "determinism"],
    "properties": {
        "model": {"type": "object", "description": "The model file's name, sha256, manifest and backend (and "
                                                   "the guide's name and sha256)."},
        "img_resolution": {"type": "integer"}, "img_channels": {"type": "integer"},
        "label_dim": {"type": "integer", "description": "Classes (0: unconditional)."},
        "sigma_min": {"type": "number", "description": "The lowest noise level a request samples at by default."},
        "sigma_max": {"type": "number", "description": "The highest noise level a request samples at by default."},
        "model_sigma_min": {"type": "number", "description": "The lowest noise level the model takes."},
        "model_sigma_max": {"type": ["number", "null"],
                            "description": "The highest noise level the model takes (null: no bound)."},
        "solvers": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["description", "reference", "nfe", "options"],
            "properties": {"description": {"type": "string"}, "reference": {"type": "string"},
                           "nfe": {"type": "string", "description": "The NFE for N time points."},
                           "options": {"type": "array", "items": {"type": "string"}}}}},
        "limits": {"type": "object", "required": ["max_batch", "fixed_batch", "max_queue", "max_images", "max_steps",
                                                  "request_timeout", "max_body_bytes"],
                   "properties": {"max_batch": {"type": "integer"}, "fixed_batch": {"type": ["integer", "null"]},
                                  "max_queue": {"type": "integer"}, "max_images": {"type": "integer"},
                                  "max_steps": {"type": "integer"}, "request_timeout": {"type": "number"},
                                  "max_body_bytes": {"type": "integer"}}},
        "guidance": {"type": "object", "properties": {"guide": {"type": "boolean"},
                                                      "classifier_free": {"type": "boolean"}}},
        "scheduler": {"type": "string", "description": "How requests are admitted and share network calls."},
        "determinism": {"type": "string", "description": "Which guarantee a served image has: batch-invariant "
                                                         "(checked at the batch sizes named), padded to batch sizes "
                                                         "that match the full batch, a fixed batch, pending (checked "
                                                         "before the first network call), or none."},
    },
}

COMPONENTS = {"Error": ERROR_SCHEMA, "GenerateRequest": None, "GenerateResult": RESULT_SCHEMA,
              "Health": HEALTH_SCHEMA, "Model": MODEL_SCHEMA}


def components() -> dict:
    return {name: request_schema() if schema is None else schema for name, schema in COMPONENTS.items()}
