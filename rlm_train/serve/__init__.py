"""Serving: `rlm-train serve`.

    launcher.py   vLLM's OpenAI-compatible server for a model spec (`gemma3-270m`, a model
                  directory) with LoRA adapters and our chat template: checks before start,
                  progress while it starts, a clean stop (the whole process group) on Ctrl-C/SIGTERM
    gateway.py    the RLM gateway (FastAPI + uvicorn) in front of any OpenAI-compatible server:
                  POST /v1/rlm, POST /v1/chat/completions (any OpenAI client), /health, /metrics
    config.py     their typed configs (ServeConfig, VLLMConfig, GatewayConfig)
    commands.py   the CLI

FastAPI and uvicorn are imported only by gateway.py, so `rlm-train serve --help` and the
launcher need neither.
"""
