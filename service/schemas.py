"""Request and response bodies of the HTTP API. The dream config and result are the library's own types.

Request bodies (and `DreamConfig`) reject unknown fields, so no request can name a path or a model to load.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dreaming.epo import DreamConfig, DreamResult
from dreaming.templates import split_template


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DreamRequest(Strict):
    feature: str = Field(examples=["12/345"], description="LAYER/INDEX")
    config: DreamConfig = Field(default_factory=DreamConfig)
    more: bool = Field(False, description="continue the stored dream of this config (the one that ran longest; "
                       "only iterations, seconds and plateau may differ) for config.iterations more iterations")


class BatchRequest(Strict):
    features: list[str] = Field(min_length=1, examples=[["12/345", "3/7"]])
    config: DreamConfig = Field(default_factory=DreamConfig)


class ActivationsRequest(Strict):
    feature: str = Field(examples=["12/345"])
    texts: list[str] = Field(min_length=1, examples=[["How do I make pancakes?"]])
    template: str | None = Field(None, examples=["\n\nHuman:{prompt}"], description=(
        "measure each text as a prompt inside this template (exactly one {prompt} slot; 'chat': the model's chat "
        "template), as a dream is: only the prompt and what follows it count, and the template's own activation "
        "is reported apart as template_activation; a dream's `prompt` and its config's template reproduce its "
        "figures"))

    @field_validator("template")
    @classmethod
    def _template(cls, template):
        if template is not None and template != "chat":
            split_template(template)
        return template


class SearchRequest(Strict):
    text: str = Field(min_length=1, examples=["def main():"])
    top: int = Field(20, ge=1)


class Progress(BaseModel):
    done: int | None = None  # iterations done, summed over the features (and seeds) of the call
    total: int | None = None
    best_fraction_of_max: float | None = None  # best fluent prompt so far (search dtype), of any feature
    seconds: float | None = None
    eta_seconds: float | None = None


class JobOut(BaseModel):
    job_id: str
    feature: str
    status: str  # queued | running | done | failed | cancelled
    attempts: int  # times a worker was given this job (> 1 after a worker died)
    progress: Progress | None = None
    error: str | None = None
    result: DreamResult | None = None


class BatchOut(BaseModel):
    batch_id: str
    status: str  # done when every job is; once none is pending, cancelled if one was, else failed; else running
    counts: dict[str, int]
    jobs: list[JobOut]


class JobSummary(BaseModel):
    """A job without its result: what a batch's table shows."""
    job_id: str
    feature: str
    status: str
    attempts: int
    progress: Progress | None = None
    error: str | None = None
    best_fluent_fraction_of_max: float | None = None  # of the result, when done
    best_fluent_prompt: str | None = None


class BatchSummary(BaseModel):
    batch_id: str
    status: str
    counts: dict[str, int]
    jobs: list[JobSummary]


class FeatureRow(BaseModel):
    feature: str
    dataset_max: float
    density: float
    mean_when_active: float
    dead: bool
    dense: bool
    has_dreams: bool


class FeatureList(BaseModel):
    total: int  # features matching the filters
    offset: int
    limit: int
    features: list[FeatureRow]


class SimilarFeature(BaseModel):
    feature: str
    cosine: float  # of the normalised decoder vectors, concatenated over every output layer
    dataset_max: float
    density: float


class JobList(BaseModel):
    total: int  # jobs matching
    offset: int
    limit: int
    jobs: list[JobSummary]  # newest first, without results (GET /jobs/{id} has the result)


class BatchLine(BaseModel):
    batch_id: str
    created: float  # Unix time
    jobs: int


class BatchList(BaseModel):
    total: int
    offset: int
    limit: int
    batches: list[BatchLine]  # newest first
