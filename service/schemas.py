"""Request and response bodies of the HTTP API. The dream config and result are the library's own types.

Request bodies (and `DreamConfig`) reject unknown fields, so no request can name a path or a model to load.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dreaming.engine import DreamConfig, DreamResult
from dreaming.maxima import SEARCH_ORDER, SearchOrder
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
    order: SearchOrder = Field(SEARCH_ORDER, description="content: positional hits (a feature whose top dataset "
                               "example is a text's first token, at this text's first token) rank after every "
                               "other hit; fraction: by fraction of max alone")


class Progress(BaseModel):
    done: int | None = None  # iterations done, summed over the features (and seeds) of the call
    total: int | None = None
    best_fraction_of_max: float | None = None  # best fluent prompt so far (search dtype), of any feature
    seconds: float | None = None
    eta_seconds: float | None = None


class JobOut(BaseModel):
    job_id: str
    feature: str
    dataset_max: float | None = None  # the feature's dataset max the dream is scored against (its yardstick)
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
    dataset_max: float | None = None
    status: str
    attempts: int
    progress: Progress | None = None
    error: str | None = None
    best_fluent_fraction_of_max: float | None = None  # of the result, when done
    # of the best dataset excerpt of the prompt's own token count (prompt_tokens): the second yardstick
    best_fluent_fraction_of_length_matched: float | None = None
    best_fluent_prompt_tokens: int | None = None
    best_fluent_activation: float | None = None
    best_fluent_cross_entropy: float | None = None
    best_fluent_prompt: str | None = None
    best_novel_fraction_of_max: float | None = None  # the same of its best novel prompt
    best_novel_fraction_of_length_matched: float | None = None
    best_novel_prompt_tokens: int | None = None
    best_novel_activation: float | None = None
    best_novel_cross_entropy: float | None = None
    best_novel_prompt: str | None = None
    yardstick: str | None = None  # a positional feature's (DreamResult.yardstick)


class BatchSummary(BaseModel):
    batch_id: str
    status: str
    counts: dict[str, int]
    jobs: list[JobSummary]


class FeatureStats(BaseModel):
    feature: str
    dataset_max: float
    density: float
    mean_when_active: float
    dead: bool
    dense: bool
    first_token: bool  # positional: its top dataset example is a text's first token (fires there whatever follows)


class FeatureRow(FeatureStats):
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
    first_token: bool  # positional: its top dataset example is a text's first token


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


class SearchHit(BaseModel):
    feature: str
    activation: float  # the feature's max over the text's tokens
    fraction_of_max: float  # of its dataset max: the ranking (content first unless the request's order is fraction)
    dataset_max: float
    density: float
    max_token: str  # the token where it is highest, as display text
    max_position: int  # its position (1: the text's first token, after the BOS)
    first_token: bool  # the feature is positional: its top dataset example is a text's first token
    positional: bool  # a positional feature at this text's first token: ranked after the content hits


class TokenSpan(BaseModel):
    tokens: list[str]  # display text of each token
    activations: list[float]  # the feature's activation on each


class LengthMatched(BaseModel):
    """A dataset example cut to a dream's length before its max token, measured alone."""
    tokens: int
    text: str
    activation: float
    fraction_of_max: float | None
    cross_entropy: float


class Example(TokenSpan):
    """A dataset example, re-measured from its window: the tokens around its max token (at `max_index`)."""
    source: str
    window: int
    document: int
    position: int
    stored_activation: float  # as the maxima pass recorded it (its dtype)
    activation: float
    fraction_of_max: float
    context: str
    max_index: int
    length_matched: LengthMatched | None = None


class ActivationRange(BaseModel):
    low: float
    high: float | None  # None: open above
    examples: list[Example]


class DreamedPrompt(TokenSpan):
    """A dreamed prompt on a feature page, its tokens from the prompt on shaded by activation."""
    prompt: str
    text: str
    activation: float
    fraction_of_max: float | None
    prompt_tokens: int | None = None  # the prompt's own token count
    length_matched_max: float | None = None  # the best top dataset example cut to prompt_tokens (the 2nd yardstick)
    fraction_of_length_matched: float | None = None  # activation ÷ length_matched_max
    cross_entropy: float
    origin: str | None
    longest_shared_run: int | None  # with the top dataset contexts
    novel: bool
    seed: int | None
    engine_version: int | None = None  # the engine that dreamed it (None: before version 5, which kept none)
    counted_from: int
    yardstick: str | None = None  # a positional feature's: what its dataset max is (DreamResult.yardstick)
    scored_against: float | None = None  # stale dreams only: the dataset max of the build they were scored against


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]
    note: str


class OutputTokens(BaseModel):
    top: list[tuple[str, float]]  # (token, logit effect): the tokens its decoder promotes most
    bottom: list[tuple[str, float]]  # and suppresses most


class FeaturePage(FeatureStats):
    """A feature's statistics and top dataset examples beside its dreamed prompts (GET /features/L/I)."""
    first_token_share: float  # of its top dataset examples, those at a text's first token
    source_max: dict[str, float]
    histogram: Histogram
    tokens: int  # of the maxima corpus
    examples: list[Example]
    intervals: list[ActivationRange]  # a few examples per activation range, highest first
    length: int | None  # the dream length the examples' length_matched figures use
    engine_version: int  # this server's engine: a dream of another says so (its own engine_version)
    dreams: list[DreamedPrompt]  # the frontier prompts of current dreams, strongest first
    diverse: list[DreamedPrompt]
    best_fluent: DreamedPrompt | None  # the most active of the current dreams' best fluent prompts
    best_novel: DreamedPrompt | None  # and of their best novel ones (no run of 4 tokens shared with the data)
    stale_dreams: list[DreamedPrompt]  # scored against another maxima build's max
    output_tokens: OutputTokens | None  # None: the dictionary has no decoders (a model's neurons)


class WorkerInfo(BaseModel):
    index: int  # the worker's slot
    gpus: int
    name: str  # the actor's name in the Ray namespace "dreaming"
    state: str  # ready | starting | restarting | error
    device: str | None = None
    error: str | None = None


class Health(BaseModel):
    status: str  # ok | degraded
    reasons: list[str]  # why it is degraded
    workers_ready: int
    workers: int
    jobs: dict[str, int] | None  # per status; None when the job store does not answer


class Info(BaseModel):
    bundle: dict  # what `dreaming info` shows of the bundle, without its path on the server
    name: str  # the bundle's name on this server
    identity: str
    workers: list[WorkerInfo]
    features_per_call: int
    limits: dict[str, int]
    api_key_required: bool
    key_on_reads: bool
    dream_config: dict  # the defaults
    dream_config_schema: dict


class BundleOut(BaseModel):
    """A served bundle (GET /v1/bundles): its routes are under /v1/bundles/{name}."""
    name: str
    default: bool  # the bundle of the routes without /bundles/{name} (the first served)
    identity: str  # of its model and transcoder
    model: str
    transcoder: str  # its kind, e.g. cross_layer_transcoder
    layers: int
    features_per_layer: int
    maxima_tokens: int | None  # tokens of the corpus its dataset maxima were taken over (None: no maxima)
