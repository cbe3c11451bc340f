// The photo lab's script: no framework, nothing loaded from elsewhere. It fills the form from
// /lab/models, sends each photo as it is to /lab/models/{m}/analyze and shows the answer.
// Server text goes into the page through textContent only.
"use strict";

const byId = (id) => document.getElementById(id);
let models = [];
let uploads = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function setStatus(text, isError = false) {
  const s = byId("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

function currentModel() {
  return models.find((m) => m.name === byId("model").value) || models[0];
}

function fillClasses() {
  const m = currentModel();
  const truth = byId("truth");
  truth.replaceChildren(truth.options[0]);
  for (const c of m.classes) truth.append(el("option", { value: c, text: c }));
  const target = m.target ? ` The attack's target class is ${m.target}.` : "";
  const detect = m.detect ? " Detection is on." : "";
  byId("server-note").textContent =
    `Model ${m.name}: input ${m.input_size.join("×")}, fit ${m.fit}, this server's defense ${m.served_defense}.` +
    target + detect;
}

async function loadModels() {
  const r = await fetch("/lab/models");
  const doc = await r.json();
  models = doc.models;
  const select = byId("model");
  for (const m of models) select.append(el("option", { value: m.name, text: `${m.name} (v${m.version})` }));
  select.closest(".field").hidden = models.length < 2;
  fillClasses();
  if (doc.keeping) {
    byId("server-note").append(" This server keeps each photo and its answer for evaluation (--lab-keep).");
  } else {
    byId("server-note").append(" Nothing is stored on the server.");
  }
}

const pct = (p) => `${(100 * p).toFixed(1)} %`;

function defenseCard(row, doc, model) {
  const served = row.defense === doc.served_defense;
  const title = row.defense === "none" ? "No defense" : row.defense;
  const head = el("h3", {}, title);
  if (served) head.append(el("span", { class: "served", text: " (this server's)" }));
  const list = el("ol", { class: "top", "aria-label": `Top ${row.top.length} classes, ${title}` });
  for (const t of row.top) {
    const li = el("li", { "data-class": t.class, "data-probability": String(t.probability) });
    const name = el("span", { class: "cls", text: t.class });
    if (model && t.class === model.target) name.append(el("span", { class: "tag target", text: "attack target" }));
    const bar = el("span", { class: "bar", "aria-hidden": "true" }, el("span"));
    bar.firstChild.style.width = `${Math.max(0, Math.min(100, 100 * t.probability))}%`;
    li.append(name, el("span", { class: "pct", text: pct(t.probability) }), bar);
    list.append(li);
  }
  const card = el("section", { class: "defense", "data-defense": row.defense }, head, list);
  const detect = [];
  if (row.trigger_score !== null && row.trigger_score !== undefined) {
    detect.push(el("span", { class: "score", text: `trigger score ${row.trigger_score.toFixed(3)}` }));
  }
  if (row.suspected !== null && row.suspected !== undefined) {
    detect.push(row.suspected
      ? el("span", { class: "tag suspected", text: "suspected trigger" })
      : el("span", { class: "tag clear", text: "not suspected" }));
  }
  if (detect.length) card.append(el("p", { class: "detect" }, ...detect.flatMap((d, i) => (i ? [" ", d] : [d]))));
  return card;
}

function outlineOverlay(outline, width, height) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  svg.setAttribute("aria-hidden", "true");
  const poly = document.createElementNS(ns, "polygon");
  // Outline points are pixel centres; the viewBox spans pixel edges (0 .. width).
  poly.setAttribute("points", outline.map(([x, y]) => `${x + 0.5},${y + 0.5}`).join(" "));
  svg.append(poly);
  return svg;
}

function render(file, doc, label, kind) {
  uploads += 1;
  const id = `result-${uploads}`;
  const model = models.find((m) => m.name === doc.model);
  const [h, w] = doc.fitted_size;
  const fit = doc.fit;
  const fitText = `fit ${fit.spec}`;  // says so when no print was found and cover was applied

  const photoUrl = URL.createObjectURL(file);
  const photo = el("img", { class: "photo", src: photoUrl, alt: `The photo you sent: ${file.name}` });
  const photoFrame = el("div", { class: "frame" }, photo);
  const photoCaption = el("figcaption", { text: "Your photo" });
  photo.addEventListener("load", () => {
    photo.classList.toggle("small", photo.naturalWidth < photoFrame.clientWidth);
    photoCaption.textContent = `Your photo, ${photo.naturalWidth}×${photo.naturalHeight}` +
      (fit.outline ? ", with the print outline found" : "");
    // The outline is in the upright photo's pixels (fit.frame), as the browser shows it.
    const [fw, fh] = fit.frame || [photo.naturalWidth, photo.naturalHeight];
    if (fit.outline) photoFrame.append(outlineOverlay(fit.outline, fw, fh));
  }, { once: true });

  const fitted = el("img", {
    class: "fitted", src: doc.fitted_png,
    alt: `The ${w}×${h} image the model saw after the ${fit.name} fit, enlarged`,
  });
  const images = el("div", { class: "images" },
    el("figure", {}, photoFrame, photoCaption),
    el("figure", {}, el("div", { class: "frame" }, fitted),
      el("figcaption", { class: "fit", "data-fit": fit.name, text: `What the model saw: ${w}×${h}, ${fitText}` })));

  const grid = el("div", { class: "defenses" });
  for (const row of doc.results) grid.append(defenseCard(row, doc, model));
  const said = [
    label ? `You said it shows ${label}` : "You did not say what it shows",
    kind ? `a ${kind} print` : null,
  ].filter(Boolean).join(", ");
  const meta = el("p", { class: "note", text: `${said}.${doc.kept ? ` Kept on the server as ${doc.kept}.` : ""}` });
  const article = el("article", { class: "result", id, "aria-labelledby": `${id}-title` },
    el("h2", { id: `${id}-title`, text: `${file.name || "photo"}: ${doc.model} v${doc.version}` }),
    images, grid, meta);
  byId("results").prepend(article);
}

async function analyze(file) {
  const m = currentModel();
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image (${file.type}).`, true);
    return;
  }
  setStatus(`Analysing ${file.name}…`);
  const label = byId("truth").value;
  const kind = byId("kind").value;
  const q = new URLSearchParams({ label, kind });
  let r, doc;
  try {
    r = await fetch(`/lab/models/${encodeURIComponent(m.name)}/analyze?${q}`, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    doc = await r.json();
  } catch (e) {
    setStatus(`Could not reach the server: ${e.message}`, true);
    return;
  }
  if (!r.ok) {
    setStatus(`${file.name}: ${doc.error || r.statusText}`, true);
    return;
  }
  render(file, doc, label, kind);
  setStatus(`${file.name}: done.`);
}

async function analyzeAll(files) {
  for (const f of files) await analyze(f);
}

function wire() {
  const input = byId("photo");
  input.addEventListener("change", async () => {
    await analyzeAll([...input.files]);
    input.value = ""; // the same file again is a new upload
  });
  byId("model").addEventListener("change", fillClasses);
  const drop = byId("drop");
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    analyzeAll([...e.dataTransfer.files]);
  });
  byId("upload").addEventListener("submit", (e) => e.preventDefault());
}

wire();
loadModels().catch((e) => setStatus(`Could not load the models: ${e.message}`, true));
