// The batch page: submit a feature list (POST /v1/batches), then follow its summary as server-sent events
// (GET /v1/batches/{id}/events) as the table fills in; the batch id stays in the address, so a reload resumes.
"use strict";

function progressText(job) {
  const best = job.progress && job.progress.best_fraction_of_max;
  if (job.status === "running" && best !== null && best !== undefined) return `running · best so far ${percent(best)}`;
  return ["failed", "cancelled"].includes(job.status) ? `${job.status}: ${job.error}` : job.status;
}

function showBatch(batch) {
  $("batch").hidden = false;
  $("batch-id").textContent = batch.batch_id;
  const c = batch.counts;
  $("batch-status").textContent = `${batch.status}: ${c.done} done, ${c.running} running, ${c.queued} queued, ` +
    `${c.failed} failed, ${c.cancelled} cancelled`;
  $("download-json").href = scoped(`/v1/batches/${batch.batch_id}/results?format=json`);
  $("download-csv").href = scoped(`/v1/batches/${batch.batch_id}/results?format=csv`);
  $("batch-table").querySelector("tbody").replaceChildren(...batch.jobs.map((job) => el("tr", {"data-status": job.status},
    el("td", {}, featureLink(job.feature)), el("td", {class: `status-${job.status}`}, progressText(job)),
    el("td", {class: "num"}, percent(job.best_fluent_fraction_of_max)),
    el("td", {class: "num"}, percent(job.best_fluent_fraction_of_length_matched)),
    el("td", {}, el("span", {class: "tokens"}, job.best_fluent_prompt ? tokenText(job.best_fluent_prompt) : "")),
    el("td", {class: "num"}, percent(job.best_novel_fraction_of_max)),
    el("td", {class: "num"}, percent(job.best_novel_fraction_of_length_matched)),
    el("td", {}, el("span", {class: "tokens"}, job.best_novel_prompt ? tokenText(job.best_novel_prompt) : "")),
    el("td", {}, job.yardstick ? el("span", {class: "tag first-token", title: job.yardstick}, "first-token max") : ""))));
}

// A download through fetch, so that the key goes with it when the server needs it on reads.
async function download(event) {
  event.preventDefault();
  const link = event.currentTarget;
  const response = await fetch(link.href, {headers: headers()});
  if (!response.ok) throw new Error(`${response.status}: the download failed`);
  const url = URL.createObjectURL(await response.blob());
  const save = el("a", {href: url, download: link.href.includes("format=csv") ? "batch.csv" : "batch.json"});
  save.click();
  URL.revokeObjectURL(url);
}

async function followBatch(batchId) {
  const last = await follow(`/v1/batches/${batchId}/events`, showBatch);
  document.body.dataset.batch = last ? last.status : "unknown";
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const features = $("batch-features").value.split(/[\s,;]+/).filter(Boolean);
  if (!features.length) return showError("Give at least one feature id, e.g. 3/17.");
  $("batch-button").disabled = true;
  try {
    const batch = await api("/v1/batches", {method: "POST",
      body: {features, config: dreamConfig("batch-config", {iterations: Number($("batch-iterations").value)})}});
    history.replaceState(null, "", pageUrl(`/batch?id=${batch.batch_id}`));
    await followBatch(batch.batch_id);
  } finally {
    $("batch-button").disabled = false;
  }
}

async function start() {
  pageFrame();
  const info = await serverInfo();
  $("batch-iterations").value = info.dream_config.iterations;
  $("batch-form").addEventListener("submit", guarded(submit));
  for (const id of ["download-json", "download-csv"]) $(id).addEventListener("click", guarded(download));
  $("batch-file").addEventListener("change", guarded(async () => {
    const file = $("batch-file").files[0];
    if (file) $("batch-features").value = await file.text();
  }));
  document.body.dataset.ready = "true";
  const resumed = new URLSearchParams(location.search).get("id");
  if (resumed) await followBatch(resumed);
}

guarded(start)();
