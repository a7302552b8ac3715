"""Putting a tuned model where people run models: a GGUF file for llama.cpp and Ollama
(`gguf_file.py` writes it, `gguf_check.py` loads it back and compares logits), and the
`rlm-train export` command (`commands.py`)."""
