"""Prometheus metrics of the service, served at /metrics: jobs per status (the queue depth among them), the
workers' state, the interactive queue, and how long engine calls take.

Gauges are read from the service when scraped (a custom collector), so they are never stale; the call-duration
histogram is observed by the scheduler.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

CALL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)  # seconds


class ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        service = self.service
        jobs = GaugeMetricFamily("dreaming_jobs", "Jobs per status (queued: the queue depth)", labels=["status"])
        for status, count in service.store.counts().items():
            jobs.add_metric([status], count)
        yield jobs
        workers = GaugeMetricFamily("dreaming_workers", "Worker actors per state", labels=["state"])
        states = [info["state"] for info in service.workers_info()]
        for state in ("ready", "starting", "restarting", "error"):
            workers.add_metric([state], states.count(state))
        yield workers
        loops = GaugeMetricFamily("dreaming_worker_loops_restarting", "Worker loops waiting to restart after an error")
        loops.add_metric([], len(service.scheduler.loop_errors) if service.scheduler else 0)
        yield loops
        waiting = GaugeMetricFamily("dreaming_interactive_waiting", "Interactive calls waiting for or using the model")
        waiting.add_metric([], sum(view.waiting for view in service.views.values()))
        yield waiting


class Metrics:
    """One registry per app: the collector and the scheduler's call-duration histogram."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        self.call_seconds = Histogram("dreaming_call_seconds", "Wall time of one engine call (up to "
                                      "DREAMING_FEATURES_PER_CALL jobs), by how it ended", ["outcome"],
                                      buckets=CALL_BUCKETS, registry=self.registry)
