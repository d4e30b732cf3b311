"""The Celery side of the worker: the app, its tasks, the model runtime, cache tiers and leases."""
