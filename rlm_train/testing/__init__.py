"""Servers and fixtures for tests and benches: the local OpenAI-compatible mock server
(`mock_server`) and tiny random models built offline (`tiny_models`). Not used at run
time: nothing outside tests, `rlm_train.bench` and `scripts/` imports this package."""
