"""The HTTP front end: FastAPI routes, request schemas, dependencies and upload checks."""
