// The slidesynth page: submit a job (POST /generate), follow the caller's jobs (GET /jobs, then each running
// job's event stream GET /jobs/{id}/events, or GET /jobs/{id} every second where the service has no stream),
// view a slide (OpenSeadragon on /jobs/{id}/slide.dzi, a µm scale bar, the mask as an overlay) and download its
// outputs. Every request carries the X-API-Key the user entered. All URLs are relative to the page, so the
// service may sit under a path prefix.

import {readEvents} from "./events.js";
import {classColours, colourise, decodeLabelPng, MaskDecodeError, NOT_A_CLASS} from "./png.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "slidesynth.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled", "expired"]);  // expired: finished, files removed (retention)
const PREVIEW_SIDE = 512;   // the preview canvas's longest side, px
const OVERLAY_SIDE = 2048;  // the mask overlay's longest side, px (a large mask is sampled down)
const POLL_MS = 1000;

const state = {
  models: new Map(),   // name → GET /models entry
  defaultModel: null,
  mask: null,          // {file, decoded | null, error | null}
  trackers: new Map(), // job id → AbortController of its event stream or poll
  rows: new Map(),     // job id → <tr>
  viewer: null,        // OpenSeadragon viewer
  maskItem: null,      // the viewer's mask overlay (a tiled image)
  maskUrl: null,       // its image (a blob: URL)
  viewing: null,       // the job shown
  eventsMissing: false, // GET /jobs/{id}/events answered 404 once: poll from then on
};

// ---------------------------------------------------------------- requests

function apiUrl(path) {
  return new URL(String(path).replace(/^\//, ""), document.baseURI).href;
}

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? {...extra, "X-API-Key": key} : extra;
}

async function api(path, options = {}) {
  const response = await fetch(apiUrl(path), {...options, headers: authHeaders(options.headers || {})});
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try { body = await response.json(); } catch { body = null; }
  } else if (response.status !== 204) {
    body = await response.text();
  }
  return {response, body};
}

function detailText(body, response) {
  if (body && typeof body === "object" && "detail" in body) {
    const detail = body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    return JSON.stringify(detail);
  }
  return `${response.status} ${response.statusText}`.trim();
}

// ---------------------------------------------------------------- field errors

const FIELD_ERRORS = ["api-key", "model", "conditioning", "mask", "mask-mpp", "subtype", "width", "height", "mpp",
                      "seed", "steps"];
// a 422's loc after "body" (and "params", the multipart part) → the input it names
const LOC_FIELDS = {model: "model", mask: "mask", mask_mpp: "mask-mpp", width: "width", height: "height",
                    mpp: "mpp", seed: "seed", steps: "steps"};

function setFieldError(field, message) {
  const error = $(`${field}-error`);
  if (!error) return false;
  error.textContent = message || "";
  const input = field === "conditioning" ? $("conditioning-fieldset") : $(field);
  if (input) {
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
  return true;
}

function clearErrors() {
  for (const field of FIELD_ERRORS) setFieldError(field, "");
  $("form-error").textContent = "";
}

function fieldOfLoc(loc) {
  const path = (loc || []).filter((part, i) => !(i === 0 && part === "body"));
  if (path[0] === "params" && path.length > 1) path.shift();
  const head = path[0];
  if (head === "conditioning") {
    return path.includes("subtype") || $("cond-subtype").checked ? "subtype" : "conditioning";
  }
  if (head === "params") return "form";
  return LOC_FIELDS[head] || "form";
}

function showProblems(status, body, response) {
  if (status === 422 && body && Array.isArray(body.detail)) {
    const general = [];
    let first = null;
    const byField = new Map();
    for (const problem of body.detail) {
      const field = fieldOfLoc(problem.loc);
      if (field === "form") {
        general.push(`${(problem.loc || []).slice(1).join(".")}: ${problem.msg}`);
        continue;
      }
      byField.set(field, [...(byField.get(field) || []), problem.msg]);
      first = first || field;
    }
    for (const [field, messages] of byField) setFieldError(field, messages.join("; "));
    $("form-error").textContent = general.join("; ");
    if (first && $(first)) $(first).focus();
    return;
  }
  if (status === 401) {
    setFieldError("api-key", detailText(body, response) + " — enter the key the service gave you.");
    $("api-key").focus();
    return;
  }
  if (status === 413) {
    setFieldError("mask", detailText(body, response));
    return;
  }
  $("form-error").textContent = `The service answered ${status}: ${detailText(body, response)}`;
}

// ---------------------------------------------------------------- models and the form

function currentModel() {
  return state.models.get($("model").value) || null;
}

function conditioningMode() {
  return $("cond-subtype").checked ? "subtype" : "mask";
}

async function loadModels() {
  const {response, body} = await api("models");
  if (!response.ok) {
    setFieldError("model", `Could not list the models: ${detailText(body, response)}`);
    return;
  }
  state.defaultModel = body.default;
  const select = $("model");
  select.replaceChildren();
  for (const model of body.models) {
    state.models.set(model.name, model);
    const option = new Option(`${model.name}${model.trained ? "" : " (untrained: not tissue)"}`, model.name);
    option.selected = model.name === body.default;
    select.append(option);
  }
  onModelChange();
}

function onModelChange() {
  const model = currentModel();
  if (!model) return;
  const takes = new Set(model.conditioning);
  const info = [`${model.engine}; conditioning: ${model.conditioning.join(", ") || "none served here"}`,
                `native ${model.native_mpp} µm/px`, `up to ${model.max_width} × ${model.max_height} px`,
                `${model.default_steps} steps by default`];
  if (!takes.has("mask") && !takes.has("subtype")) {
    info.push("this page submits masks and subtypes only: send embeddings through the API (POST /generate, JSON)");
  }
  $("model-info").textContent = info.join(" · ");
  $("cond-mask").disabled = !takes.has("mask");
  $("cond-subtype").disabled = !takes.has("subtype");
  if ($("cond-mask").disabled && $("cond-mask").checked && !$("cond-subtype").disabled) $("cond-subtype").checked = true;
  if ($("cond-subtype").disabled && $("cond-subtype").checked && !$("cond-mask").disabled) $("cond-mask").checked = true;
  const subtype = $("subtype");
  const previous = subtype.value;
  subtype.replaceChildren(...Object.values(model.subtypes || {}).map((name) => new Option(name, name)));
  if ([...subtype.options].some((o) => o.value === previous)) subtype.value = previous;
  $("steps").placeholder = String(model.default_steps);
  $("mpp").placeholder = String(model.native_mpp);
  $("width").max = model.max_width;
  $("height").max = model.max_height;
  $("submit").disabled = !takes.has("mask") && !takes.has("subtype");
  onModeChange();
}

function onModeChange() {
  const mode = conditioningMode();
  $("mask-group").hidden = mode !== "mask";
  $("subtype-group").hidden = mode !== "subtype";
  if (mode === "subtype") {
    $("width").readOnly = $("height").readOnly = false;
    if (!$("width").value) $("width").value = 512;
    if (!$("height").value) $("height").value = 512;
    $("size-info").textContent = "";
  } else {
    syncSizeFromMask();
  }
  renderPreview();
}

function slideMpp() {
  const model = currentModel();
  const value = parseFloat($("mpp").value);
  return value > 0 ? value : (model ? model.native_mpp : NaN);
}

// With a mask, the slide's size is the mask's size × mask µm/px ÷ µm/px (the service derives it so; width and
// height are not sent). Editing the width or height sets the mask µm/px that gives it.
function syncSizeFromMask() {
  const decoded = state.mask && state.mask.decoded;
  const mpp = slideMpp();
  if (!decoded) {
    $("size-info").textContent = state.mask ? "The size comes from the mask." : "Choose a mask: it sets the size.";
    return;
  }
  const maskMpp = parseFloat($("mask-mpp").value) > 0 ? parseFloat($("mask-mpp").value) : mpp;
  const scale = maskMpp / mpp;
  const width = Math.max(8, Math.round(decoded.width * scale)), height = Math.max(8, Math.round(decoded.height * scale));
  $("width").value = width;
  $("height").value = height;
  $("size-info").textContent = `Mask ${decoded.width} × ${decoded.height} px at ${round(maskMpp)} µm/px → slide ` +
    `${width} × ${height} px at ${round(mpp)} µm/px (${round(width * mpp / 1000)} × ${round(height * mpp / 1000)} mm).`;
}

function onSizeEdit(axis) {
  const decoded = state.mask && state.mask.decoded;
  if (conditioningMode() !== "mask" || !decoded) return;
  const value = parseInt($(axis).value, 10);
  if (!(value > 0)) return;
  const side = axis === "width" ? decoded.width : decoded.height;
  $("mask-mpp").value = round(slideMpp() * value / side, 6);
  syncSizeFromMask();
  $(axis).value = value;
}

function round(value, digits = 4) {
  return Number.isFinite(value) ? Number(value.toPrecision(digits)) : value;
}

async function onMaskChosen() {
  const file = $("mask").files[0];
  setFieldError("mask", "");
  $("mask-info").textContent = "";
  state.mask = file ? {file, decoded: null, error: null} : null;
  if (file) {
    const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
    if (head[0] === 0x89 && head[1] === 0x50) {
      try {
        state.mask.decoded = await decodeLabelPng(file, PREVIEW_SIDE);
      } catch (err) {
        state.mask.error = err instanceof MaskDecodeError ? `This mask ${err.message}.` : String(err);
      }
    } else {
      $("mask-info").textContent = "A TIFF mask: no preview here; the service reads its size and resolution.";
    }
  }
  syncSizeFromMask();
  renderPreview();
}

function renderPreview() {
  const canvas = $("mask-preview"), legend = $("class-legend");
  const model = currentModel();
  const colours = classColours(model ? model.classes : {});
  const decoded = state.mask && state.mask.decoded;
  const present = decoded ? decoded.counts : new Map();
  const total = decoded ? decoded.width * decoded.height : 0;
  legend.replaceChildren();
  for (const [id, cls] of colours) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${cls.rgb.join(",")})`;
    const share = present.has(id) ? ` — ${round(100 * present.get(id) / total, 3)} %` : "";
    item.append(swatch, `${id} ${cls.name}${share}`);
    if (present.has(id)) item.className = "present";
    legend.append(item);
  }
  if (state.mask && state.mask.error) setFieldError("mask", state.mask.error);
  if (!decoded) {
    canvas.hidden = true;
    canvas.dataset.classes = "";
    canvas.setAttribute("aria-label", "Mask preview: no mask chosen");
    return;
  }
  canvas.width = decoded.outWidth;
  canvas.height = decoded.outHeight;
  canvas.getContext("2d").putImageData(colourise(decoded, colours), 0, 0);
  canvas.hidden = false;
  const ids = [...present.keys()];
  const strangers = ids.filter((id) => !colours.has(id));
  const names = ids.filter((id) => colours.has(id)).map((id) => colours.get(id).name);
  canvas.dataset.classes = ids.join(",");
  canvas.setAttribute("aria-label", `Mask preview, ${decoded.width} × ${decoded.height} px: ${names.join(", ")}` +
                                    (strangers.length ? `; values that are no class: ${strangers.join(", ")}` : ""));
  $("mask-info").textContent = `${decoded.width} × ${decoded.height} px; classes ${ids.join(", ")}.`;
  if (strangers.length && model) {
    setFieldError("mask", `Values ${strangers.join(", ")} are not classes of ${model.name} (shown in magenta ` +
                          `rgb(${NOT_A_CLASS.join(",")})); the service will refuse this mask.`);
  }
}

function numberField(id, parse = Number) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  return Number.isNaN(value) ? raw : value;  // a non-number goes as typed: the service names the field
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  $("form-status").textContent = "";
  const model = currentModel();
  const params = {};
  if (model) params.model = model.name;
  const mode = conditioningMode();
  for (const [field, key] of [["mpp", "mpp"], ["seed", "seed"], ["steps", "steps"]]) {
    const value = numberField(field);
    if (value !== undefined) params[key] = value;
  }
  if ($("zarr").checked) params.outputs = ["tiff", "zarr"];
  let request;
  if (mode === "mask") {
    const file = $("mask").files[0];
    if (!file) {
      setFieldError("mask", "Choose a mask file (PNG or TIFF), or pick Subtype.");
      $("mask").focus();
      return;
    }
    const maskMpp = numberField("mask-mpp");
    if (maskMpp !== undefined) params.mask_mpp = maskMpp;
    const form = new FormData();
    form.append("mask", file, file.name);
    form.append("params", JSON.stringify(params));
    request = {method: "POST", body: form};
  } else {
    for (const field of ["width", "height"]) {
      const value = numberField(field);
      if (value !== undefined) params[field] = value;
    }
    params.conditioning = {type: "subtype", subtype: $("subtype").value};
    request = {method: "POST", body: JSON.stringify(params), headers: {"Content-Type": "application/json"}};
  }
  $("submit").disabled = true;
  try {
    const {response, body} = await api("generate", request);
    if (response.status === 202) {
      $("form-status").dataset.job = body.id;
      $("form-status").textContent = `Job ${body.id.slice(0, 8)} queued${body.untrained ? " (untrained model: not tissue)" : ""}.`;
      await refreshJobs();
    } else {
      showProblems(response.status, body, response);
    }
  } catch (err) {
    $("form-error").textContent = `The request failed: ${err.message}`;
  } finally {
    $("submit").disabled = false;
  }
}

// ---------------------------------------------------------------- jobs

function formatSeconds(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor(seconds % 3600 / 60)} min`;
}

function progressText(job) {
  const parts = [job.status];
  if (job.status === "running") {
    if (job.stage) parts.push(job.stage + (job.stage === "sampling" && job.step != null ? ` ${job.step}/${job.steps}` : ""));
    parts.push(`${Math.round(100 * job.progress)} %`);
    if (job.eta_seconds != null) parts.push(`ETA ${formatSeconds(job.eta_seconds)}`);
  }
  if (job.cancel_requested && !TERMINAL.has(job.status)) parts.push("cancel requested");
  if (job.status === "failed" && job.error) parts.push(job.error);
  return parts.join(" · ");
}

function renderJob(job) {
  let row = state.rows.get(job.id);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.job = job.id;
    row.innerHTML = `<td class="id"><code></code><div class="hint created"></div></td><td class="model"></td>
      <td class="size"></td><td class="progress"><progress max="1" value="0"></progress>
      <span class="status" aria-live="polite"></span></td><td class="actions"></td>`;
    state.rows.set(job.id, row);
  }
  row.dataset.status = job.status;
  row.querySelector(".id code").textContent = job.id.slice(0, 8);
  row.querySelector(".id code").title = job.id;
  row.querySelector(".created").textContent = new Date(job.created_at).toLocaleString();
  row.querySelector(".model").textContent = job.model + (job.untrained ? " (untrained)" : "");
  row.querySelector(".size").textContent = `${job.width} × ${job.height} px, ${job.mpp} µm/px, seed ${job.seed}, ${job.steps} steps`;
  const bar = row.querySelector("progress");
  bar.value = job.status === "succeeded" ? 1 : job.progress;
  bar.setAttribute("aria-label", `Job ${job.id.slice(0, 8)} progress`);
  row.querySelector(".status").textContent = progressText(job);
  const actions = row.querySelector(".actions");
  actions.replaceChildren();
  if (job.status === "succeeded" && job.links.deepzoom) {
    const view = document.createElement("button");
    view.type = "button";
    view.className = "view";
    view.textContent = "View";
    view.setAttribute("aria-label", `View job ${job.id.slice(0, 8)}`);
    view.addEventListener("click", () => openViewer(job));
    actions.append(view);
  }
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary";
  remove.textContent = TERMINAL.has(job.status) ? "Delete" : "Cancel";
  remove.setAttribute("aria-label", `${remove.textContent} job ${job.id.slice(0, 8)}`);
  remove.addEventListener("click", () => removeJob(job));
  actions.append(remove);
  if (state.viewing && state.viewing.id === job.id && job.status === "succeeded") showDownloads(job);
  return row;
}

async function refreshJobs() {
  $("jobs-error").textContent = "";
  let result;
  try {
    result = await api("jobs?limit=50");
  } catch (err) {
    $("jobs-error").textContent = `Could not list the jobs: ${err.message}`;
    return;
  }
  const {response, body} = result;
  if (!response.ok) {
    const text = detailText(body, response);
    $("jobs-error").textContent = `Could not list your jobs: ${text}`;
    if (response.status === 401) setFieldError("api-key", `${text} — enter the key the service gave you.`);
    return;
  }
  setFieldError("api-key", "");
  const tbody = $("jobs").querySelector("tbody");
  const seen = new Set();
  const rows = body.items.map((job) => { seen.add(job.id); return renderJob(job); });
  for (const [id, controller] of state.trackers) {
    if (!seen.has(id)) { controller.abort(); state.trackers.delete(id); }
  }
  for (const id of [...state.rows.keys()]) if (!seen.has(id)) state.rows.delete(id);
  tbody.replaceChildren(...rows);
  $("jobs-empty").hidden = rows.length > 0;
  for (const job of body.items) if (!TERMINAL.has(job.status)) track(job.id);
}

async function removeJob(job) {
  const {response, body} = await api(`jobs/${job.id}`, {method: "DELETE"});
  if (!response.ok) {
    $("jobs-error").textContent = `Could not ${TERMINAL.has(job.status) ? "delete" : "cancel"} job ` +
      `${job.id.slice(0, 8)}: ${detailText(body, response)}`;
    return;
  }
  if (state.viewing && state.viewing.id === job.id && response.status === 204) closeViewer();
  await refreshJobs();
}

function onJobUpdate(job) {
  const row = renderJob(job);
  if (!row.isConnected) {
    $("jobs").querySelector("tbody").prepend(row);
    $("jobs-empty").hidden = true;
  }
}

// Follow one job until it is terminal: its event stream when the service has one, else a poll every second.
function track(jobId) {
  if (state.trackers.has(jobId)) return;
  const controller = new AbortController();
  state.trackers.set(jobId, controller);
  const done = () => { if (state.trackers.get(jobId) === controller) state.trackers.delete(jobId); };
  (async () => {
    try {
      if (!state.eventsMissing) {
        const finished = await followEvents(jobId, controller.signal);
        if (finished) return;
      }
      await poll(jobId, controller.signal);
    } catch (err) {
      if (err.name !== "AbortError") $("jobs-error").textContent = `Lost job ${jobId.slice(0, 8)}: ${err.message}`;
    } finally {
      done();
    }
  })();
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); },
                            {once: true});
  });
}

async function poll(jobId, signal) {
  for (;;) {
    let response;
    try {
      response = await fetch(apiUrl(`jobs/${jobId}`), {headers: authHeaders(), signal});
    } catch (err) {
      if (err.name === "AbortError") throw err;
      await sleep(POLL_MS * 5, signal);  // the service is unreachable (restarting?): try again
      continue;
    }
    if (response.ok) {
      const job = await response.json();
      onJobUpdate(job);
      if (TERMINAL.has(job.status)) return;
    } else if (response.status === 404) {
      return;  // deleted meanwhile
    }
    await sleep(POLL_MS, signal);
  }
}

// GET /jobs/{id}/events: server-sent events read with fetch (EventSource cannot send X-API-Key). Each event is
// `event: job`, `id: <seq>`, `data: <the GET /jobs/{id} JSON>`; the stream ends after a terminal status.
// → true when the job reached a terminal status; false to poll instead (no such endpoint, or the stream keeps
// breaking).
async function followEvents(jobId, signal) {
  let lastId = null, failures = 0;
  while (failures < 3) {
    const headers = authHeaders({Accept: "text/event-stream"});
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(apiUrl(`jobs/${jobId}/events`), {headers, signal, cache: "no-store"});
    } catch (err) {
      if (err.name === "AbortError") throw err;
      failures++;
      await sleep(POLL_MS, signal);
      continue;
    }
    if (response.status === 404 || response.status === 405) {
      // FastAPI's bare "Not Found": the service has no event stream, so poll this and every later job; a 404
      // naming the job: it is gone (the poll sees that too)
      let detail = null;
      try { detail = (await response.json()).detail; } catch { /* not JSON */ }
      if (response.status === 405 || detail === "Not Found") state.eventsMissing = true;
      return false;
    }
    if (!response.ok || !response.body) {
      failures++;
      await sleep(POLL_MS, signal);
      continue;
    }
    for await (const event of readEvents(response.body, signal)) {
      if (event.id !== null) lastId = event.id;
      if (event.event !== "job" || !event.data) continue;
      let job;
      try { job = JSON.parse(event.data); } catch { continue; }  // not a job: skip it
      onJobUpdate(job);
      failures = 0;
      if (TERMINAL.has(job.status)) return true;  // leaving the loop closes the stream
    }
    failures++;  // ended before a terminal status: reconnect from the last event
    await sleep(POLL_MS / 2, signal);
  }
  return false;
}

// ---------------------------------------------------------------- viewer

function dropMaskOverlay() {
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = null;
  state.maskItem = null;
}

function closeViewer() {
  if (state.viewer) state.viewer.close();
  dropMaskOverlay();
  state.viewing = null;
  $("viewer-section").hidden = true;
}

function ensureViewer() {
  if (state.viewer) return state.viewer;
  if (typeof OpenSeadragon === "undefined") return null;
  const viewer = OpenSeadragon({
    id: "viewer", prefixUrl: apiUrl("web/openseadragon/images/"), drawer: "canvas", showNavigator: true,
    navigatorPosition: "TOP_RIGHT", crossOriginPolicy: false, maxZoomPixelRatio: 4, visibilityRatio: 0.5,
    gestureSettingsMouse: {clickToZoom: false},
  });
  const bar = $("scale-bar");
  bar.hidden = false;
  viewer.addControl(bar, {anchor: OpenSeadragon.ControlAnchor.BOTTOM_LEFT, autoFade: false});
  for (const name of ["open", "animation", "animation-finish", "resize", "update-viewport"]) {
    viewer.addHandler(name, updateScaleBar);
  }
  viewer.addHandler("open-failed", (e) => { $("viewer-error").textContent = `The slide did not open: ${e.message}`; });
  viewer.addHandler("tile-load-failed", (e) => { $("viewer-error").textContent = `A tile did not load: ${e.message}`; });
  state.viewer = viewer;
  return viewer;
}

const NICE = [1, 2, 5];

// A scale bar of a round length (1, 2 or 5 × 10^k µm) at most 150 screen px long.
function updateScaleBar() {
  const viewer = state.viewer, job = state.viewing;
  const item = viewer && viewer.world.getItemAt(0);
  const bar = $("scale-bar");
  if (!item || !job) return;
  const imageZoom = item.viewportToImageZoom(viewer.viewport.getZoom(true));  // screen px per slide px
  const umPerPx = job.mpp / imageZoom;
  const most = 150 * umPerPx;
  let length = 0;
  for (let exp = Math.floor(Math.log10(most)) - 1; exp <= Math.floor(Math.log10(most)); exp++) {
    for (const n of NICE) {
      const candidate = n * 10 ** exp;
      if (candidate <= most) length = candidate;
    }
  }
  if (!length) return;
  const label = length >= 1000 ? `${round(length / 1000)} mm` : `${round(length)} µm`;
  bar.querySelector(".bar").style.width = `${(length / umPerPx).toFixed(1)}px`;
  bar.querySelector(".label").textContent = label;
  bar.dataset.umPerPx = String(umPerPx);
}

async function openViewer(job) {
  $("viewer-section").hidden = false;
  $("viewer-error").textContent = "";
  state.viewing = job;
  dropMaskOverlay();
  $("viewer-info").textContent = `Job ${job.id.slice(0, 8)}: ${job.width} × ${job.height} px at ${job.mpp} µm/px ` +
    `(${round(job.width * job.mpp / 1000)} × ${round(job.height * job.mpp / 1000)} mm), ${job.model}, seed ${job.seed}.`;
  showDownloads(job);
  const container = $("viewer");
  const viewer = ensureViewer();
  const toggle = $("mask-toggle"), opacity = $("mask-opacity");
  toggle.checked = false;
  toggle.disabled = opacity.disabled = true;
  container.dataset.mask = "none";
  $("mask-status").textContent = job.links.mask ? "" : "(this job has no mask)";
  if (!viewer) {
    $("viewer-error").textContent = document.getElementById("assets-missing")?.textContent ||
      "OpenSeadragon did not load: run `make web`, then reload.";
    return;
  }
  container.dataset.state = "loading";
  const headers = authHeaders();
  const withKey = Object.keys(headers).length > 0;
  viewer.loadTilesWithAjax = withKey;
  viewer.ajaxHeaders = headers;
  // the headers go with the tile source too: OpenSeadragon 5 fetches a plain-URL descriptor without the
  // viewer's ajaxHeaders
  viewer.open({tileSource: apiUrl(job.links.deepzoom), ajaxHeaders: headers, loadTilesWithAjax: withKey});
  viewer.addOnceHandler("open", () => {
    if (state.viewing !== job) return;
    updateScaleBar();
    // polled, not on "fully-loaded-change" (headless browsers' virtual time may not deliver it)
    const poll = setInterval(() => {
      const item = viewer.world.getItemAt(0);
      if (state.viewing !== job || !item) { clearInterval(poll); return; }
      if (item.getFullyLoaded()) { clearInterval(poll); container.dataset.state = "loaded"; }
    }, 200);
    if (job.links.mask) loadMaskOverlay(job);
  });
}

async function loadMaskOverlay(job) {
  const container = $("viewer"), toggle = $("mask-toggle"), opacity = $("mask-opacity");
  container.dataset.mask = "loading";
  $("mask-status").textContent = "loading the mask…";
  try {
    const response = await fetch(apiUrl(job.links.mask), {headers: authHeaders()});
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const decoded = await decodeLabelPng(await response.blob(), OVERLAY_SIDE);
    const model = state.models.get(job.model);
    const canvas = document.createElement("canvas");
    canvas.width = decoded.outWidth;
    canvas.height = decoded.outHeight;
    canvas.getContext("2d").putImageData(colourise(decoded, classColours(model ? model.classes : {}),
                                                   {transparentUnknown: true}), 0, 0);
    const url = URL.createObjectURL(await new Promise((resolve) => canvas.toBlob(resolve, "image/png")));
    if (state.viewing !== job) { URL.revokeObjectURL(url); return; }
    state.maskUrl = url;  // the overlay's tiles load from it whenever they are (re)drawn: kept while it is shown
    const slide = state.viewer.world.getItemAt(0);
    const bounds = slide.getBounds();
    state.viewer.addTiledImage({
      tileSource: {type: "image", url, buildPyramid: false}, x: bounds.x, y: bounds.y, width: bounds.width,
      opacity: 0, preload: true, loadTilesWithAjax: false,  // preload: its tiles load while it is hidden
      success: (event) => {
        if (state.viewing !== job) return;
        state.maskItem = event.item;
        toggle.disabled = opacity.disabled = false;
        container.dataset.mask = "hidden";
        $("mask-status").textContent = "";
      },
      error: (event) => {
        container.dataset.mask = "failed";
        $("mask-status").textContent = `the mask overlay failed: ${event.message}`;
      },
    });
  } catch (err) {
    container.dataset.mask = "failed";
    $("mask-status").textContent = `the mask overlay failed: ${err.message}`;
  }
}

function applyMaskOverlay() {
  const item = state.maskItem;
  if (!item || !state.viewer) return;
  const shown = $("mask-toggle").checked;
  item.setOpacity(shown ? Number($("mask-opacity").value) : 0);
  state.viewer.forceRedraw();
  // reported once its tiles are in and the next frames are drawn
  const report = () => {
    if (state.maskItem !== item) return;
    if (!item.getFullyLoaded()) { setTimeout(report, 100); return; }
    state.viewer.forceRedraw();
    requestAnimationFrame(() => requestAnimationFrame(() => {
      if (state.maskItem === item) $("viewer").dataset.mask = $("mask-toggle").checked ? "shown" : "hidden";
    }));
  };
  report();
}

const DOWNLOADS = [
  ["slide", "Pyramidal TIFF", (id) => `slidesynth-${id}.tiff`],
  ["thumbnail", "Thumbnail (PNG)", (id) => `slidesynth-${id}-thumbnail.png`],
  ["mask", "Label mask at output resolution (PNG)", (id) => `slidesynth-${id}-mask.png`],
  ["zarr", "OME-Zarr (its folder listing; open the URL with a Zarr reader)", (id) => `slidesynth-${id}-zarr.json`],
  ["deepzoom", "Deep Zoom descriptor (DZI)", (id) => `slidesynth-${id}.dzi`],
];

function showDownloads(job) {
  const list = $("downloads");
  list.replaceChildren();
  for (const [kind, label, filename] of DOWNLOADS) {
    const path = job.links[kind];
    if (!path) continue;
    const link = document.createElement("a");
    link.href = apiUrl(path);
    link.download = filename(job.id);
    link.textContent = label;
    link.dataset.kind = kind;
    link.addEventListener("click", (event) => download(event, link));
    const item = document.createElement("li");
    item.append(link);
    list.append(item);
  }
}

// With an API key a plain link cannot send the header: fetch the file, then save it from a blob URL.
async function download(event, link) {
  if (!apiKey()) return;
  event.preventDefault();
  const status = document.createElement("span");
  status.className = "hint";
  status.textContent = " downloading…";
  link.after(status);
  try {
    const response = await fetch(link.href, {headers: authHeaders()});
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch { /* not JSON */ }
      throw new Error(detailText(body, response));
    }
    const url = URL.createObjectURL(await response.blob());
    const save = document.createElement("a");
    save.href = url;
    save.download = link.download;
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    status.remove();
  } catch (err) {
    status.className = "error";
    status.textContent = ` download failed: ${err.message}`;
  }
}

// ---------------------------------------------------------------- start

function init() {
  const key = $("api-key");
  try { key.value = localStorage.getItem(KEY_STORAGE) || ""; } catch { /* storage disabled */ }
  key.addEventListener("change", () => {
    try {
      if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey()); else localStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled */ }
    for (const controller of state.trackers.values()) controller.abort();
    state.trackers.clear();
    closeViewer();
    refreshJobs();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key.dispatchEvent(new Event("change"));
  });
  $("api-key-forget").addEventListener("click", () => {
    key.value = "";
    key.dispatchEvent(new Event("change"));
  });
  $("model").addEventListener("change", () => { onModelChange(); });
  $("cond-mask").addEventListener("change", onModeChange);
  $("cond-subtype").addEventListener("change", onModeChange);
  $("mask").addEventListener("change", onMaskChosen);
  $("mask-mpp").addEventListener("input", syncSizeFromMask);
  $("mpp").addEventListener("input", () => { if (conditioningMode() === "mask") syncSizeFromMask(); });
  $("width").addEventListener("change", () => onSizeEdit("width"));
  $("height").addEventListener("change", () => onSizeEdit("height"));
  $("generate-form").addEventListener("submit", submit);
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("mask-toggle").addEventListener("change", applyMaskOverlay);
  $("mask-opacity").addEventListener("input", applyMaskOverlay);
  loadModels().finally(() => { document.body.dataset.ready = "models"; });
  refreshJobs();
}

init();
