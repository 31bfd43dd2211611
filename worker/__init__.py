"""The job side: the Celery app, the thin task adapter and the pure job pipeline."""
