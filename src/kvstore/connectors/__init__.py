"""Engine connectors: move KV between an inference engine's cache and a kvstore.

Each connector lives in its own module and imports its engine on first use, so
importing this package never pulls in transformers, vLLM or SGLang.
"""
