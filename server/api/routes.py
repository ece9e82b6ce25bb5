"""Thin routes: parse (pydantic), hand to a serving object, return. No logic lives here."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api import __version__
from server.api.errors import ERROR_RESPONSES, APIError, error_body
from server.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 DetokenizeResponse, TokenizeRequest, TokenizeResponse,
                                 TokenizerInfoResponse)
from server.api.responses import (ChatCompletionResponse, CompletionResponse, ModelCard, ModelList,
                                  VersionResponse)
from server.api.serving.state import ServingState

router = APIRouter()
SSE_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with stream: true"}}


def _serving(request: Request) -> ServingState:
    state: ServingState | None = request.app.state.serving
    if request.app.state.draining:
        raise APIError(503, "The server is shutting down.")
    if state is None:
        raise APIError(503, "The model is still loading.")
    return state


@router.post("/v1/completions", response_model=CompletionResponse, responses={**SSE_DOC, **ERROR_RESPONSES})
async def create_completion(body: CompletionRequest, request: Request):
    return await _serving(request).completions.create(body, request)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**SSE_DOC, **ERROR_RESPONSES})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await _serving(request).chat.create(body, request)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    serving = _serving(request).completions
    return ModelList(data=[ModelCard(id=serving.model_name, max_model_len=serving.max_model_len)])


@router.get("/model_info", responses=ERROR_RESPONSES)
@router.get("/server_info", responses=ERROR_RESPONSES)
async def model_info(request: Request) -> dict:
    """SGLang's metadata probes, which sglang-router (and vllm-router) send to each backend: the
    served name is the model the router lists under /v1/models and routes requests by."""
    serving = _serving(request).completions
    return {"model_path": serving.model_name, "served_model_name": serving.model_name, "tokenizer_path": None,
            "is_generation": True, "max_context_length": serving.max_model_len,
            "tp_size": request.app.state.config.engine.tensor_parallel_size, "dp_size": 1,
            "quantization": request.app.state.config.engine.quantization,
            "kv_cache_dtype": request.app.state.config.engine.kv_cache_dtype}


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await _serving(request).tokens.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return _serving(request).tokens.detokenize(body)


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=ERROR_RESPONSES)
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    return _serving(request).tokens.tokenizer_info()


@router.get("/health", responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> Response:
    """200 once the model is loaded and the engine loop runs; 503 otherwise."""
    state: ServingState | None = request.app.state.serving
    if request.app.state.draining:
        return JSONResponse(error_body(503, "shutting down"), status_code=503)
    if state is None:
        return JSONResponse(error_body(503, "the model is still loading"), status_code=503)
    if not state.async_engine.is_healthy:
        return JSONResponse(error_body(503, state.async_engine.failure), status_code=503)
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
