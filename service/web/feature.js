// A feature's dashboard: its dataset statistics and top examples (GET /v1/features/L/I) beside its dreams, a
// Pareto plot of both, a live "test a prompt" box (POST /v1/activations), a dream button (POST /v1/dreams,
// followed as server-sent events) and the features with the most similar decoders.
"use strict";

const [, , LAYER, INDEX] = location.pathname.split("/").map((part) => decodeURIComponent(part));
const FEATURE = `${LAYER}/${INDEX}`;
const charts = {};
let page = null; // the feature's JSON
let maxIterations = null; // the dream config's bound (GET /v1/info)

function chart(id, config) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart($(id), {...config, options: {maintainAspectRatio: false, animation: false, ...config.options}});
}

function stat(label, value) {
  return el("div", {}, el("b", {}, value), el("span", {class: "muted"}, label));
}

function renderStats() {
  $("feature-id").textContent = FEATURE;
  $("feature-bundle").textContent = BUNDLE ? `of bundle ${BUNDLE}` : "";
  document.title = `dreaming: feature ${FEATURE}` + (BUNDLE ? ` (${BUNDLE})` : "");
  $("stats").replaceChildren(stat("dataset max", number(page.dataset_max)), stat("density", percent(page.density)),
    stat("mean when active", number(page.mean_when_active)), stat("tokens in the maxima pass", page.tokens.toLocaleString()),
    stat("best fluent dream", bothYardsticks(page.best_fluent)),
    stat("best novel dream", bothYardsticks(page.best_novel)));
  if (page.dead) showError(`Feature ${FEATURE} is dead: it was never active on the corpus, so it has no dataset max.`);
  $("first-token").hidden = !page.first_token;
  $("first-token").replaceChildren(firstTokenBadge(), ` Its top dataset example is a text's first token (as are ` +
    `${percent(page.first_token_share)} of its top examples), where it fires whatever follows. A prompt reaches that ` +
    "max only when nothing comes before it, so its dreams in the chat template are dreamed in the bare template " +
    "{prompt} instead, and say so (their yardstick).");
}

// "112% of max · 131% of the best 32-token excerpt": a dream against the dataset max and the data at its length
function bothYardsticks(dream) {
  if (!dream) return percent(null);
  const excerpt = dream.fraction_of_length_matched;
  return `${percent(dream.fraction_of_max)} of max` + (excerpt === null || excerpt === undefined ? "" :
    ` · ${percent(excerpt)} of the best ${dream.prompt_tokens}-token excerpt`);
}

function renderCharts() {
  const sources = Object.keys(page.source_max);
  chart("source-chart", {type: "bar",
    data: {labels: sources, datasets: [{label: "max per corpus source", data: sources.map((s) => page.source_max[s]),
      backgroundColor: "#fb923c"}]},
    options: {plugins: {title: {display: true, text: "Max activation per corpus source"}, legend: {display: false}}}});
  const {edges, counts} = page.histogram;
  const labels = counts.slice(1).map((_, i) => i + 1 < edges.length ? `≤ ${number(edges[i + 1], 2)}` : `> ${number(edges.at(-1), 2)}`);
  chart("histogram-chart", {type: "bar",
    data: {labels, datasets: [{label: "tokens", data: counts.slice(1), backgroundColor: "#60a5fa"}]},
    options: {scales: {y: {type: "logarithmic"}},
      plugins: {title: {display: true, text: "Activation histogram (active tokens, log scale)"}, legend: {display: false}}}});
  $("histogram-note").textContent = `Inactive on ${counts[0].toLocaleString()} of ${page.tokens.toLocaleString()} tokens.`;
}

function origin(dream) {
  const earlier = dream.engine_version !== page.engine_version;
  return el("span", {}, el("span", {class: "tag"}, dream.origin || "–"), earlier ?
    el("span", {class: "tag", title: "dreamed by an earlier engine"}, `engine ${dream.engine_version ?? "< 5"}`) : "");
}

function novelty(dream) {
  const run = dream.longest_shared_run;
  if (run === null || run === undefined) return "–";
  return dream.novel ? `${run} (novel)` : String(run);
}

function dreamRow(dream, stale = false) {
  const excerpt = stale ? [] : [el("td", {class: "num", title: "of the best top dataset example cut to this many tokens"},
    percent(dream.fraction_of_length_matched)), el("td", {class: "num"}, dream.prompt_tokens ?? "–")];
  return el("tr", {class: "dream"},
    el("td", {class: "num"}, percent(dream.fraction_of_max)), ...excerpt,
    el("td", {class: "num"}, number(dream.cross_entropy, 2)),
    ...(stale ? [el("td", {class: "num"}, number(dream.scored_against))] : [el("td", {}, origin(dream)),
      el("td", {class: "num"}, novelty(dream))]),
    el("td", {}, shadeTokens(dream.tokens, dream.activations, page.dataset_max)));
}

function fillTable(id, rows, empty, columns) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", {colspan: columns, class: "muted"}, empty)));
}

function renderDreams() {
  const none = "No dream yet: press Dream.";
  const best = [["best fluent", page.best_fluent], ["best novel", page.best_novel]].filter(([, dream]) => dream);
  fillTable("best-table", best.map(([name, dream]) => {
    const row = dreamRow(dream);
    row.prepend(el("td", {}, name));
    return row;
  }), page.dreams.length ? "No fluent dream yet." : none, 8);
  const yardsticks = [...new Set(page.dreams.map((d) => d.yardstick).filter(Boolean))];
  $("dream-yardstick").textContent = yardsticks.map((y) => `Yardstick: ${y}.`).join(" ");
  $("dream-yardstick").hidden = !yardsticks.length;
  fillTable("diverse-table", page.diverse.map((d) => dreamRow(d)), none, 7);
  fillTable("frontier-table", page.dreams.map((d) => dreamRow(d)), none, 7);
  fillTable("stale-table", page.stale_dreams.map((d) => dreamRow(d, true)), "", 4);
  $("stale").hidden = !page.stale_dreams.length;
  $("dream-count").textContent = page.dreams.length ? `(${page.dreams.length} on the frontier)` : "";
}

function renderExamples() {
  $("matched-heading").textContent = `last ${page.length} tokens alone`;
  fillTable("examples-table", page.examples.map((example) => el("tr", {class: "example"},
    el("td", {class: "num"}, percent(example.fraction_of_max)), el("td", {}, el("span", {class: "tag"}, example.source)),
    el("td", {}, shadeTokens(example.tokens, example.activations, page.dataset_max, example.max_index)),
    el("td", {class: "num", title: example.length_matched ? example.length_matched.text : ""},
      example.length_matched ? `${percent(example.length_matched.fraction_of_max)} · CE ${number(example.length_matched.cross_entropy, 2)}` : "–"))),
  "No example: the feature was never active on the corpus.", 4);
}

function renderIntervals() {
  const rows = page.intervals.flatMap((range) => range.examples.map((example, i) => el("tr", {class: "interval"},
    el("td", {}, i ? "" : `(${number(range.low, 3)}, ${range.high === null ? "∞" : number(range.high, 3)}]`),
    el("td", {class: "num"}, percent(example.fraction_of_max)), el("td", {}, el("span", {class: "tag"}, example.source)),
    el("td", {}, shadeTokens(example.tokens, example.activations, page.dataset_max, example.max_index)))));
  fillTable("intervals-table", rows, "None kept: these dataset maxima were built before activation ranges were sampled.", 4);
  const tokens = (pairs) => pairs.map(([token, value]) => el("span", {class: "tag", title: value.toFixed(3)}, tokenText(token)));
  const none = () => [el("span", {class: "muted"}, "none: this dictionary has no decoders")]; // one node per place
  $("top-tokens").replaceChildren(...(page.output_tokens ? tokens(page.output_tokens.top) : none()));
  $("bottom-tokens").replaceChildren(...(page.output_tokens ? tokens(page.output_tokens.bottom) : none()));
}

function renderPareto() {
  const point = (d) => ({x: d.cross_entropy, y: 100 * d.fraction_of_max, label: d.prompt ?? d.text});
  const matched = page.examples.filter((e) => e.length_matched).map((e) => point(e.length_matched));
  const frontier = page.dreams.map(point).sort((a, b) => a.x - b.x);
  const xs = [...matched, ...frontier].map((p) => p.x);
  const span = xs.length ? [Math.min(...xs), Math.max(...xs)] : [0, 1];
  chart("pareto-chart", {type: "scatter",
    data: {datasets: [
      {label: "dreams: Pareto frontier", data: frontier, showLine: true, borderColor: "#ea580c", backgroundColor: "#ea580c"},
      {label: "dreams: diverse set", data: page.diverse.map(point), backgroundColor: "#7c3aed", pointStyle: "triangle", radius: 6},
      {label: `dataset examples: last ${page.length} tokens alone`, data: matched, backgroundColor: "#2563eb"},
      {label: "dataset max", data: span.map((x) => ({x, y: 100})), type: "line", borderDash: [6, 4], borderColor: "#6b7280",
        pointRadius: 0},
    ]},
    options: {scales: {x: {title: {display: true, text: "cross-entropy (nats/token, lower is more fluent)"}},
      y: {title: {display: true, text: "% of dataset max"}}},
      plugins: {tooltip: {callbacks: {label: (item) => `${item.raw.label ?? ""} (${item.raw.y.toFixed(1)}%, CE ${item.raw.x.toFixed(2)})`}}}}});
  $("pareto-note").textContent = "Dataset examples are cut to their last tokens up to the max token and measured " +
    "alone, so they sit at the fluency and length of a dream.";
}

function render() {
  renderStats();
  renderCharts();
  renderDreams();
  renderExamples();
  renderIntervals();
  renderPareto();
}

async function load() {
  page = await api(`/v1/features/${LAYER}/${INDEX}`);
  render();
}

// ------------------------------------------------------------------------------------------- test a prompt

let testTimer = null;
let testAsked = 0;

async function testPrompt() {
  const text = $("test-text").value;
  const asked = ++testAsked;
  if (!text.trim()) return $("test-result").replaceChildren();
  const template = $("test-template").value || null;
  try {
    const [measured] = await api("/v1/activations", {method: "POST", body: {feature: FEATURE, texts: [text], template}});
    if (asked !== testAsked) return; // a newer text is on its way
    const from = measured.counted_from;
    $("test-result").replaceChildren(
      el("b", {}, `${percent(measured.fraction_of_max)} of max`), ` (activation ${number(measured.activation)}) `,
      shadeTokens(measured.pieces.slice(from), measured.token_activations.slice(from), page.dataset_max));
    $("test-result").dataset.activation = measured.activation;
  } catch (error) {
    if (asked === testAsked) $("test-result").replaceChildren(el("span", {class: "error"}, error.message));
  }
}

// --------------------------------------------------------------------------------------------------- dream

function describeProgress(job) {
  const p = job.progress || {};
  if (job.status === "queued") return "queued…";
  if (job.status !== "running") return job.status;
  const parts = ["running"];
  if (p.total) parts.push(`${p.done}/${p.total} iterations`);
  if (p.best_fraction_of_max !== null && p.best_fraction_of_max !== undefined) parts.push(`best fluent so far ${percent(p.best_fraction_of_max)}`);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined) parts.push(`about ${Math.ceil(p.eta_seconds)} s left`);
  return parts.join(" · ");
}

async function dream(event) {
  event.preventDefault();
  showError("");
  $("dream-button").disabled = true;
  try {
    // a time budget runs as many iterations as the server allows until the time is spent
    const budget = $("dream-seconds").value ? {seconds: Number($("dream-seconds").value), iterations: maxIterations}
      : {iterations: Number($("dream-iterations").value)};
    const config = dreamConfig("dream-config", budget);
    let job = await api("/v1/dreams", {method: "POST", body: {feature: FEATURE, config}});
    $("dream-progress").textContent = describeProgress(job);
    if (!["done", "failed", "cancelled"].includes(job.status)) {
      job = await follow(`/v1/jobs/${job.job_id}/events`, (update) => { $("dream-progress").textContent = describeProgress(update); });
    }
    if (job.status === "failed") throw new Error(`the dream failed: ${job.error}`);
    if (job.status === "cancelled") throw new Error(`the dream was cancelled: ${job.error}`);
    $("dream-progress").textContent = `done: best fluent ${bothYardsticks(job.result.best_fluent)}`;
    await load();
  } finally {
    $("dream-button").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ similar

async function similar() {
  if (!page.output_tokens) { // no decoders (a model's neurons): nothing to compare
    fillTable("similar-table", [], "This dictionary has no decoders (a model's neurons): no similar features.", 4);
    return;
  }
  const found = await api(`/v1/features/${LAYER}/${INDEX}/similar?top=10`);
  fillTable("similar-table", found.map((s) => el("tr", {}, el("td", {}, featureLink(s.feature), " ",
    s.first_token ? firstTokenBadge() : ""),
    el("td", {class: "num"}, number(s.cosine)), el("td", {class: "num"}, number(s.dataset_max)),
    el("td", {class: "num"}, percent(s.density)))), "No other feature has a decoder.", 4);
}

async function start() {
  pageFrame();
  const [info] = await Promise.all([serverInfo(), load()]);
  const perLayer = info.bundle.transcoder.features_per_layer;
  const layers = info.bundle.transcoder.layer_ids; // the layers the dictionary has (some only, for an SAE)
  const flat = layers.indexOf(Number(LAYER)) * perLayer + Number(INDEX);
  const link = (id, at) => {
    if (at < 0 || at >= layers.length * perLayer) return $(id).removeAttribute("href");
    $(id).href = pageUrl(`/features/${layers[Math.floor(at / perLayer)]}/${at % perLayer}`);
  };
  link("previous-feature", flat - 1);
  link("next-feature", flat + 1);
  $("dream-iterations").value = info.dream_config.iterations;
  maxIterations = info.dream_config_schema.properties.iterations.maximum;
  $("dream-form").addEventListener("submit", guarded(dream));
  $("test-text").addEventListener("input", () => { clearTimeout(testTimer); testTimer = setTimeout(testPrompt, 250); });
  $("test-template").addEventListener("change", testPrompt);
  await similar();
  document.body.dataset.ready = "true";
}

guarded(start)();
