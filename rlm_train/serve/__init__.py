"""Serving: `rlm-train serve`.

    launcher.py   vLLM's OpenAI-compatible server for a model spec (`gemma3-270m`, a model
                  directory) with LoRA adapters and our chat template: checks before start,
                  progress while it starts, a clean stop (the whole process group) on Ctrl-C/SIGTERM
    vllm_window.py, vllm_memory.py, vllm_install.py, vllm_log.py
                  its window, its memory on a CPU build, which vLLM an interpreter has, and the
                  line of its log that says why it died
    gateway.py    the RLM gateway (FastAPI + uvicorn) in front of any OpenAI-compatible server:
                  POST /v1/rlm, POST /v1/chat/completions (any OpenAI client), /health, /metrics;
                  gateway_chat.py: how a chat request becomes an episode (question, context,
                  parameters); gateway_api/_body/_http/_metrics/_thread/_tree.py: the rest
    config.py     their typed configs (ServeConfig, VLLMConfig, GatewayConfig)
    commands.py   the CLI

FastAPI and uvicorn are imported only by gateway.py, so `rlm-train serve --help` and the
launcher need neither.
"""
