"""The HTTP service: FastAPI app, job store and Ray workers over the dreaming library (not built yet)."""
