"""Serving: an OpenAI-compatible HTTP server with continuous batching on the engine (`slimlm serve`).

protocol.py   the wire types (pydantic): requests, responses, stream chunks, errors
errors.py     OpenAI's error shape for every failure
state.py      settings, served models, what handlers share
app.py        the FastAPI app: routes, API key, the OpenAPI schema
handlers.py   the route handlers: read and check a request, tokenize off the event loop
generation.py requests to the scheduler and back: text deltas, choices, streams, disconnects
scoring.py    prompt log-probabilities (run on the scheduler's thread)
scheduler.py  continuous batching on the engine, one thread owning the model
metrics.py    Prometheus metrics
server.py     loading models, listening, uvicorn with an explicit shutdown
load_test_client.py  a load-test client (`slimlm bench --serve`), not part of the server
"""
