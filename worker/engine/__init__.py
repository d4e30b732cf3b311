"""The engine: decoding, preprocessing, the model, AdaReTaKe compression and the compressed-KV artifact.

It imports no Celery, Redis, FastAPI or ``service``: a CLI, a notebook or a test uses it directly.
"""
