// The diagnosis page: upload one radiograph, show the API's answer. No external assets; text from the
// server (names, messages) goes in through textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let last = null;
let uploads = 0;  // numbers the uploads: only the latest one's answer is shown

function show(id, on) { $(id).hidden = !on; }

function setError(message) {
  $("error").textContent = message || "";
  show("error", Boolean(message));
}

// The headline metric never alone: its split, its images and its interval (or that it has none).
function headline(test) {
  if (!test || test.mean_auroc == null) return "not recorded";
  const value = test.mean_auroc.toFixed(3);
  const interval = test.ci_low != null && test.ci_high != null
    ? ` (95% CI ${test.ci_low.toFixed(2)}-${test.ci_high.toFixed(2)})` : ", no interval";
  return `${value}${interval} on ${test.n} ${test.split} images`;
}

function showWarnings(warnings) {
  const box = $("warnings");
  box.replaceChildren();
  for (const w of warnings || []) {
    const p = document.createElement("p");
    p.dataset.kind = w.kind;
    p.textContent = `Warning: ${w.text}`;
    box.append(p);
  }
  show("warnings", Boolean(warnings && warnings.length));
}

async function loadCard() {
  const response = await fetch("/api/model-card");
  const data = await response.json();
  $("card-text").textContent = data.markdown;
}

async function loadModel() {
  const response = await fetch("/api/model");
  model = await response.json();
  const split = model.test ? model.test.split : "test";
  const rows = [
    ["model", model.kind === "finetune" ? "fine-tuned network" : "frozen backbone + trained head"],
    ["backbone", model.backbone], ["weights", model.weights], ["input", model.view],
    ["training data", model.training_data], ["date", model.date],
    // A binary model's one AUROC is its result, not a mean over one finding.
    [`${split} ${single() ? "AUROC" : "mean AUROC"}`, headline(model.test)],
    single() ? ["finding", model.label_names[0]] : ["findings", String(model.label_names.length)],
    ["thresholds", model.thresholds_note],
    ["probabilities", model.calibration],
  ];
  const dl = $("model");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v == null ? "" : String(v);
    dl.append(dt, dd);
  }
  $("notice").textContent = model.notice;
  showWarnings(model.warnings);
  loadCard().catch((err) => { $("card-text").textContent = `no model card: ${err}`; });
}

// A model of one finding (a binary task, e.g. tuberculosis or not) answers in one line, not a table of one row.
function single() { return Boolean(model && model.label_names.length === 1); }

function renderVerdict(findings) {
  const f = findings[0];
  const call = f.above_threshold ? "positive" : "negative";
  const fallback = f.threshold_source && f.threshold_source.startsWith("fallback") ? " (fallback)" : "";
  $("verdict").dataset.call = call;
  $("verdict").textContent = `${f.name}: ${call} (probability ${f.probability.toFixed(4)}, `
    + `${f.above_threshold ? "at or above" : "below"} the model's threshold ${f.threshold.toFixed(4)}${fallback})`;
}

function renderTable(findings) {
  const body = $("findings").querySelector("tbody");
  body.replaceChildren();
  for (const f of findings) {
    const tr = document.createElement("tr");
    if (f.above_threshold) tr.className = "above";
    tr.dataset.finding = f.name;
    const name = document.createElement("td"); name.textContent = f.name;
    const p = document.createElement("td"); p.className = "num"; p.textContent = f.probability.toFixed(4);
    const t = document.createElement("td"); t.className = "num"; t.textContent = f.threshold.toFixed(4);
    if (f.threshold_source && f.threshold_source.startsWith("fallback")) {
      t.textContent += " (fallback)";
      t.classList.add("fallback");
    }
    t.title = f.threshold_source || "";
    const barCell = document.createElement("td");
    const bar = document.createElement("span"); bar.className = "bar";
    bar.style.width = `${Math.round(120 * f.probability)}px`;
    barCell.append(bar);
    tr.append(name, p, t, barCell);
    body.append(tr);
  }
}

// A value in [0, 1] -> an RGB colour on viridis (matplotlib's stops at ninths): perceptually uniform, dark
// to light, so equal steps of evidence look equal, and no red end for the eye to read as "disease here".
const VIRIDIS = [[68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140], [40, 174, 128],
  [94, 201, 98], [173, 220, 48], [253, 231, 37]];
function colour(v) {
  const x = Math.min(0.999, Math.max(0, v)) * (VIRIDIS.length - 1);
  const i = Math.floor(x), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

// The colour scale beside the heatmap, drawn from the same stops.
function drawScale() {
  const stops = VIRIDIS.map((c, i) => `rgb(${c.join(",")}) ${(100 * i / (VIRIDIS.length - 1)).toFixed(1)}%`);
  $("cam-scale-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
}

function drawHeatmap() {
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  const name = $("cam-class").value;
  if (!last || !last.cam || !last.cam.maps[name] || !$("cam-show").checked) {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const [w, h] = last.cam.grid;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const sctx = small.getContext("2d");
  const pixels = sctx.createImageData(w, h);
  last.cam.maps[name].forEach((row, y) => row.forEach((v, x) => {
    const [r, g, b] = colour(v);
    pixels.data.set([r, g, b, 255], 4 * (y * w + x));
  }));
  sctx.putImageData(pixels, 0, 0);
  const img = $("image");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function renderResult(data) {
  last = data;
  $("image").src = data.preview;
  $("caption").textContent = `${data.image.name} (${(data.image.bytes / 1024).toFixed(0)} KB)`;
  renderTable(data.findings);
  const one = data.findings.length === 1;
  if (one) renderVerdict(data.findings);
  show("verdict", one);
  show("findings", !one);
  const select = $("cam-class");
  select.replaceChildren();
  if (data.cam) {
    for (const f of data.findings) {
      const o = document.createElement("option"); o.value = f.name; o.textContent = f.name; select.append(o);
    }
    $("cam-note").textContent = "Class activation map: where the network's evidence for the chosen finding lies.";
  } else {
    $("cam-note").textContent = `No heatmap: ${data.cam_note || "this model has none"}.`;
  }
  show("cam-controls", Boolean(data.cam));
  if (data.masked_input) {
    $("masked").src = data.masked_input;
    const qa = data.lung_qa ? `; lung mask flags: ${data.lung_qa}` : "";
    $("lung-caption").textContent = `What the model saw: the lungs only (lung fraction ${Number(data.lung_fraction).toFixed(2)}${qa})`;
  }
  show("lung", Boolean(data.masked_input));
  const t = data.timing_ms;
  $("timing").textContent = `answered in ${t.total} ms (decode ${t.decode} ms, model ${t.model_and_wait} ms, batch of ${data.batch_size})`;
  show("result", true);
  $("image").onload = drawHeatmap;
}

// Everything shown of the previous file (image, findings, heatmap, masked input), gone once another is
// chosen: a failed upload's error never stands over a film that is not the one named in the chooser.
function clearResult() {
  last = null;
  show("result", false);
  $("image").onload = null;
  for (const id of ["image", "masked"]) $(id).removeAttribute("src");
  for (const id of ["caption", "cam-note", "lung-caption", "timing", "verdict"]) $(id).textContent = "";
  $("findings").querySelector("tbody").replaceChildren();
  $("cam-class").replaceChildren();
  show("cam-controls", false);
  show("lung", false);
  drawHeatmap();  // with nothing to draw: clears the canvas
}

async function upload(file) {
  const mine = ++uploads;
  clearResult();
  setError("");
  $("status").textContent = `Reading ${file.name} ...`;
  const form = new FormData();
  form.append("file", file, file.name);
  const cam = model && model.has_cam ? "&cam=all" : "";
  try {
    const response = await fetch(`/api/predict?preview=1${cam}`, { method: "POST", body: form });
    const data = await response.json();
    if (mine !== uploads) return;  // another file was chosen meanwhile
    if (!response.ok) {
      $("status").textContent = "";
      setError(data.error || `the server answered ${response.status}`);
      return;
    }
    $("status").textContent = "";
    renderResult(data);
    document.body.dataset.state = "done";
  } catch (err) {
    if (mine !== uploads) return;
    $("status").textContent = "";
    setError(`upload failed: ${err}`);
  }
}

function wire() {
  drawScale();
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
  $("cam-class").addEventListener("change", drawHeatmap);
  $("cam-show").addEventListener("change", drawHeatmap);
}

wire();
loadModel().catch((err) => setError(`cannot reach the model: ${err}`));
