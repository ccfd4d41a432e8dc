"""The HTTP service: FastAPI app, job store and Ray workers over the dreaming library (`dreaming serve`)."""
