// The home page: a bundle picker when the server serves several (GET /v1/bundles), the features most active on a
// text (POST /v1/search) and a paginated listing (GET /v1/features).
"use strict";

const PAGE_SIZE = 50;
let offset = 0;

async function search(event) {
  event.preventDefault();
  showError("");
  const text = $("search-text").value;
  if (!text.trim()) return showError("Type or paste a text to search.");
  const order = $("search-order").value;
  const found = await api("/v1/search", {method: "POST", body: {text, top: 20, order}});
  const body = $("search-results").querySelector("tbody");
  body.replaceChildren(...found.map((hit) => el("tr", {class: hit.positional ? "positional" : null},
    el("td", {}, featureLink(hit.feature)), el("td", {class: "num"}, percent(hit.fraction_of_max)),
    el("td", {class: "num"}, number(hit.activation)), el("td", {class: "num"}, percent(hit.density)),
    el("td", {}, el("span", {class: "tokens"}, tokenText(hit.max_token))),
    el("td", {}, hit.first_token ? firstTokenBadge() : ""))));
  if (!found.length) body.append(el("tr", {}, el("td", {colspan: 6, class: "muted"}, "No feature is active on this text.")));
  $("search-note").textContent = SEARCH_ORDERS[order];
  $("search-note").hidden = false;
  $("search-results").hidden = false;
}

const SEARCH_ORDERS = {
  content: "Ranked by % of max; positional features, which fire on a text's first token, are listed last when " +
    "they peak at this text's first token (order “% of max alone” mixes them in).",
  fraction: "Ranked by % of max alone: positional features, which fire on a text's first token, are mixed in.",
};

async function browse() {
  const query = new URLSearchParams({offset, limit: PAGE_SIZE, sort: $("browse-sort").value,
    live: $("browse-live").checked, dreams: $("browse-dreams").checked});
  if ($("browse-layer").value) query.set("layer", $("browse-layer").value);
  if ($("browse-dense").value) query.set("dense", $("browse-dense").value);
  const listing = await api(`/v1/features?${query}`);
  $("browse-table").querySelector("tbody").replaceChildren(...listing.features.map((row) => el("tr", {},
    el("td", {}, featureLink(row.feature)), el("td", {class: "num"}, number(row.dataset_max)),
    el("td", {class: "num"}, percent(row.density)), el("td", {class: "num"}, number(row.mean_when_active)),
    el("td", {}, row.has_dreams ? el("span", {class: "tag"}, "dreamed") : "",
      row.first_token ? firstTokenBadge() : ""))));
  const last = Math.min(offset + PAGE_SIZE, listing.total);
  $("browse-range").textContent = listing.total ? `${offset + 1}–${last} of ${listing.total}` : "no feature matches";
  $("browse-previous").disabled = offset === 0;
  $("browse-next").disabled = last >= listing.total;
}

// The picker of the served bundles, shown when there are several: picking one opens this page in it.
async function bundlePicker() {
  const bundles = await api("/v1/bundles", {scope: false});
  const picker = $("bundle-picker");
  picker.replaceChildren(...bundles.map((bundle) => el("option", {value: bundle.name},
    `${bundle.name}: ${bundle.model}, ${bundle.layers} layers × ${bundle.features_per_layer} features`)));
  picker.value = BUNDLE || bundles[0].name;
  picker.addEventListener("change", () => { location.href = `/?bundle=${encodeURIComponent(picker.value)}`; });
  $("bundle-choice").hidden = bundles.length < 2;
}

async function start() {
  pageFrame();
  const [info] = await Promise.all([serverInfo(), bundlePicker()]);
  const tc = info.bundle.transcoder;
  const maxima = info.bundle.maxima;
  $("bundle").textContent = `${info.bundle.model.name} · ${tc.kind.replaceAll("_", " ")}: ${tc.layers} layers × ` +
    `${tc.features_per_layer} features (${tc.activation})` +
    (maxima ? ` · dataset maxima over ${maxima.tokens.toLocaleString()} tokens in ${maxima.windows.toLocaleString()} windows` : "");
  for (const layer of tc.layer_ids) $("browse-layer").append(el("option", {value: layer}, layer));
  $("search-form").addEventListener("submit", guarded(search));
  $("browse-form").addEventListener("change", guarded(() => { offset = 0; return browse(); }));
  $("browse-previous").onclick = guarded(() => { offset = Math.max(0, offset - PAGE_SIZE); return browse(); });
  $("browse-next").onclick = guarded(() => { offset += PAGE_SIZE; return browse(); });
  await browse();
  document.body.dataset.ready = "true";
}

guarded(start)();
