// medldm's pages: one script for every kind (dataset, run, samples, evaluation, index), reading the page's data
// from <script id="medldm-data" type="application/json">. Nothing is loaded from outside the page's folder:
// NiiVue comes as view/niivue.umd.js, each volume as a script view/vol/KEY.js (browsers refuse fetch() from file://
// but run a local classic script), or, when the page is served over http (medldm view --serve), from its NIfTI file.
"use strict";

const DATA = JSON.parse(document.getElementById("medldm-data").textContent);
const $ = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) { if (v) el.addEventListener(k.slice(2), v); }
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
};
const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v ?? "");
const served = location.protocol === "http:" || location.protocol === "https:";

// ---- volumes ---------------------------------------------------------------------------------------------------
const waiting = {};
window.medldmVolume = (key, base64) => { if (waiting[key]) waiting[key].resolve(base64); };
function volumeBase64(key) {
  if (!waiting[key]) {
    const w = {};
    w.promise = new Promise((resolve, reject) => { w.resolve = resolve; w.reject = reject; });
    const s = document.createElement("script");
    s.src = `view/vol/${key}.js`;
    s.onerror = () => w.reject(new Error(`view/vol/${key}.js could not be loaded (rerun medldm view)`));
    document.head.append(s);
    waiting[key] = w;
  }
  return waiting[key].promise;
}
// a layer: {key, url, name, colormap, opacity}; served pages read the original file where it lies in the folder
async function loadImage(layer) {
  const opts = { name: `${layer.name || layer.key}.nii.gz`, colormap: layer.colormap || "gray",
                 opacity: layer.opacity ?? 1 };
  if (served && layer.url) return niivue.NVImage.loadFromUrl({ ...opts, url: layer.url });
  if (!layer.key) throw new Error(`${layer.name} is not embedded in this page`
                                  + ((DATA.notes || []).length ? " (see the note at the top)" : ""));
  return niivue.NVImage.loadFromBase64({ ...opts, base64: await volumeBase64(layer.key) });
}

// ---- the viewer: one to three synced NiiVue panels, reused between openings --------------------------------------
const viewer = { el: null, panels: [], opened: 0, loaded: 0, error: null };
function viewerBox() {
  if (viewer.el) return viewer.el;
  viewer.el = $("div", { id: "viewer" });
  document.querySelector("h1").after(viewer.el);
  return viewer.el;
}
function panel(i) {
  while (viewer.panels.length <= i) {
    const canvas = $("canvas", { id: `gl${viewer.panels.length}` });
    const label = $("div", { class: "label" });
    // NiiVue sizes its canvas to the canvas's parent: a parent of fixed height, or the two grow each other
    const box = $("div", { class: "panel" }, label, $("div", { class: "glbox" }, canvas));
    // axial, coronal, sagittal and a 3D rendering in a grid, whatever the panel's shape
    const nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true, isResizeCanvas: true,
                                   dragAndDropEnabled: false, loadingText: "loading",
                                   multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID,
                                   multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS,
                                   crosshairColor: [1, 0.2, 0.2, 0.6], crosshairWidth: 0.75,
                                   crosshairWidthUnit: "mm" });
    viewer.panels.push({ box, label, canvas, nv, attached: nv.attachToCanvas(canvas) });
  }
  return viewer.panels[i];
}
// panels: [{label, layers: [layer, ...]}]; the first layer is the volume, the others overlays
async function openViewer(title, panels, extra) {
  const box = viewerBox();
  const ticket = ++viewer.opened;
  box.className = "open";
  const status = $("span", { class: "status" }, "loading…");
  const row = $("div", { class: "panels" });
  box.replaceChildren($("div", { class: "bar" }, $("span", { class: "title" }, title), extra || null, status,
                        $("button", { onclick: () => { box.className = "";
                                                         history.replaceState(null, "", location.pathname + location.search); } },
                          "close")), row);
  try {
    for (let i = 0; i < panels.length; i++) {
      const p = panel(i);
      p.label.textContent = panels[i].label;
      row.append(p.box);
      await p.attached;
      while (p.nv.volumes.length) p.nv.removeVolume(p.nv.volumes[0]);
      for (const layer of panels[i].layers) p.nv.addVolume(await loadImage(layer));
      if (ticket !== viewer.opened) return;  // another volume was opened meanwhile
      p.nv.setSliceType(p.nv.sliceTypeMultiplanar);
      p.nv.resizeListener();
    }
    const used = viewer.panels.slice(0, panels.length).map((p) => p.nv);
    used.forEach((nv) => nv.broadcastTo(used.filter((o) => o !== nv), { "2d": true, "3d": true }));
    used.forEach((nv) => nv.drawScene());
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));
    const shape = panels[0].layers[0].info;
    status.textContent = shape ? `${shape.shape.join("×")} voxels, ${shape.spacing_mm.join("×")} mm, ${shape.axcodes}`
                               : "";
    viewer.loaded = ticket;
    viewer.error = null;
  } catch (e) {
    status.textContent = `not shown: ${e.message}`;
    status.classList.add("warning");
    viewer.error = e.message;
  }
  box.scrollIntoView({ block: "start" });
}
// what the tests (and a curious user in the console) read: the volumes each panel shows, with their geometry
window.medldmViewer = {
  state: () => ({ opened: viewer.opened, loaded: viewer.loaded, error: viewer.error,
                  panels: viewer.panels.filter((p) => p.box.isConnected).map((p) => ({
                    label: p.label.textContent,
                    volumes: p.nv.volumes.map((v) => ({ name: v.name, dims: Array.from(v.hdr.dims).slice(1, 4),
                                                        affine: v.hdr.affine.map((r) => Array.from(r)),
                                                        opacity: v.opacity })) })) }),
};
// whether a volume can open here: embedded, or served and inside the served folder
const viewable = (v) => !!(v && (v.key || (served && v.url)));
const layer = (v, extra) => ({ key: v.key, url: v.url, name: v.name, info: DATA.volumes[v.key], ...extra });

// ---- a sortable table -------------------------------------------------------------------------------------------
// columns: [{key, label, numeric}]; rows: objects (row._class colours the row, row._open() opens it)
function table(columns, rows, initial) {
  const body = $("tbody");
  const head = columns.map((c) => $("th", { "data-key": c.key, title: c.help || null }, c.label || c.key));
  let sortKey = null, ascending = true;
  const value = (r, c) => r[c.key];
  function render() {
    body.replaceChildren(...rows.map((r) => {
      const tr = $("tr", { class: r._class || null });
      for (const c of columns) {
        const v = value(r, c);
        const cell = $("td", { class: c.numeric ? "num" : (c.key === "qc_status" ? `status-${v}` : null) },
                       c.render ? c.render(r) : fmt(v));
        tr.append(cell);
      }
      if (r._open) { tr.style.cursor = "pointer"; tr.addEventListener("click", r._open); }
      return tr;
    }));
  }
  function sortBy(key, asc) {
    const c = columns.find((x) => x.key === key);
    sortKey = key; ascending = asc;
    const blank = (v) => v === "" || v === null || v === undefined || (typeof v === "number" && isNaN(v));
    rows.sort((a, b) => {
      const x = value(a, c), y = value(b, c);
      if (blank(x) || blank(y)) return blank(x) - blank(y);  // blanks last either way
      const d = c.numeric ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return asc ? d : -d;
    });
    head.forEach((h) => { h.className = h.dataset.key === key ? (asc ? "sorted-asc" : "sorted-desc") : ""; });
    render();
  }
  head.forEach((h) => h.addEventListener("click", () =>
    sortBy(h.dataset.key, sortKey === h.dataset.key ? !ascending : true)));
  if (initial) initial(rows);
  render();
  return $("table", { class: "sortable" }, $("thead", {}, $("tr", {}, head)), body);
}

// ---- curves as SVG: raw and smoothed, steps on x -----------------------------------------------------------------
function smooth(values, w = 0.9) {
  let last = 0, norm = 0;
  return values.map((v) => { last = w * last + (1 - w) * v; norm = w * norm + (1 - w); return last / norm; });
}
function curve(tag, points) {
  const W = 330, H = 190, L = 52, B = 22, T = 6, R = 8;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const log = ys.every((y) => y > 0) && Math.max(...ys) > 10 * Math.min(...ys);
  const f = log ? Math.log10 : (y) => y;
  const fy = ys.map(f), x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...fy), y1 = Math.max(...fy);
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const path = (vals) => vals.map((y, i) => `${i ? "L" : "M"}${px(xs[i]).toFixed(1)},${py(y).toFixed(1)}`).join("");
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const add = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
  };
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#0c0c0c", stroke: "#333" });
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, v = log ? 10 ** y : y;
    add("text", { x: L - 4, y: py(y) + 4, "text-anchor": "end", fill: "#999", "font-size": 10 }, fmt(+v.toPrecision(3)));
  }
  add("text", { x: L, y: H - 6, fill: "#999", "font-size": 10 }, `step ${x0}`);
  add("text", { x: W - R, y: H - 6, fill: "#999", "font-size": 10, "text-anchor": "end" }, `${x1}`);
  const validation = tag.startsWith("val/");
  if (validation) {
    add("path", { d: path(fy), stroke: "#e55", fill: "none", "stroke-width": 1.5 });
    fy.forEach((y, i) => add("circle", { cx: px(xs[i]), cy: py(y), r: 2.5, fill: "#e55" }));
  } else {
    add("path", { d: path(fy), stroke: "#48a", fill: "none", "stroke-width": 0.8, opacity: 0.5 });
    add("path", { d: path(smooth(ys).map(f)), stroke: "#6bf", fill: "none", "stroke-width": 1.8 });
  }
  const last = ys[ys.length - 1];
  const title = `${tag}${log ? " (log)" : ""}: last ${fmt(last)} at step ${xs[xs.length - 1]}`;
  return $("div", { class: "curve", "data-tag": tag }, $("div", { class: "t", title }, title),
           svg);
}

// ---- links to one volume: index.html#open=NAME opens it (the address bar shows it for whatever is open) ----------
const openers = {};
const linkTo = (name) => `#open=${encodeURIComponent(name)}`;
function opener(name, fn) {
  openers[name] = () => { history.replaceState(null, "", linkTo(name)); return fn(); };
  return openers[name];
}
function openFromLink() {
  if (!location.hash.startsWith("#open=")) return;
  const name = decodeURIComponent(location.hash.slice("#open=".length));
  if (openers[name]) openers[name]();
  else document.querySelector(".sub").after($("p", { class: "warning" },
    `${name} (named in this address) is not a volume this page can open`));
}

// ---- page kinds ---------------------------------------------------------------------------------------------
const main = document.getElementById("main");
const section = (title, ...children) => main.append($("h2", {}, title), ...children);
const figures = (list) => $("div", { class: "figures" }, list.map((f) =>
  $("figure", {}, $("a", { href: f.src }, $("img", { src: f.src, loading: "lazy", alt: f.caption || f.src })),
    f.caption ? $("figcaption", {}, f.caption) : null)));
const conditionText = (c) => Object.entries(c || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "unconditional";

function datasetPage() {
  const d = DATA.dataset;
  const open = (r) => () => openViewer(`${r.image} (${r.split}, QC ${r.qc_status})`,
                                       [{ label: r.image, layers: [layer(r.volume)] }]);
  const rows = d.rows.map((r) => ({ ...r, _class: r.qc_status, _open: viewable(r.volume) ? opener(r.image, open(r)) : null }));
  const order = { fail: 0, warn: 1, pass: 2 };
  main.append($("p", { class: "note" }, `${d.rows.length} scans: ${d.counts.pass || 0} pass, ${d.counts.warn || 0} `
    + `warn, ${d.counts.fail || 0} fail. Flagged scans first; click a column to sort by it, a row to scroll through `
    + "the scan in 3D (axial, coronal, sagittal and a rendering; drag to move the crosshair)."));
  section("QC table", table(d.columns, rows, (rs) => rs.sort((a, b) =>
    (order[a.qc_status] ?? 3) - (order[b.qc_status] ?? 3) || String(a.image).localeCompare(String(b.image)))));
  section("Contact sheets", figures(d.figures));
}

function runPage() {
  const r = DATA.run;
  main.append($("p", { class: "note" }, r.note));
  const tags = Object.keys(r.scalars);
  // the loss, the validation scores, the other losses, then how the run ran (learning rate, speed, memory)
  const operational = ["train/lr", "train/seconds_per_step", "train/skipped_nonfinite", "train/gpu_max_memory_gib"];
  const order = (t) => (t === "train/loss" ? 0 : t.startsWith("val/") ? 1 : operational.includes(t) ? 4
                        : t.startsWith("train/") ? 2 : 3);
  tags.sort((a, b) => order(a) - order(b) || a.localeCompare(b));
  section("Loss curves and validation scores",
          tags.length ? $("div", { class: "curves" }, tags.map((t) => curve(t, r.scalars[t])))
                      : $("p", {}, "nothing logged yet"));
  for (const [tag, frames] of Object.entries(r.previews)) {
    const img = $("img", { src: frames[frames.length - 1].src, alt: tag });
    const label = $("span", {}, "");
    const show = (i) => { img.src = frames[i].src; label.textContent = ` step ${frames[i].step} (${i + 1} of ${frames.length})`; };
    const slider = $("input", { type: "range", min: 0, max: frames.length - 1, value: frames.length - 1,
                                oninput: (e) => show(+e.target.value) });
    show(frames.length - 1);
    section(`Previews over time: ${tag}`, $("div", {}, slider, label), $("div", { class: "previews" }, img));
  }
  if (r.figures.length) section("Figures", figures(r.figures));
  section("Checkpoints", r.checkpoints.length ? table(
    [{ key: "name" }, { key: "bytes", numeric: true }], r.checkpoints.map((c) => ({ ...c })))
    : $("p", {}, "none yet"));
  section("Configuration", $("pre", {}, r.config));
}

function sampleViews(s) {
  // the sample; beside it, its nearest training volume and a real test scan of the same age where known
  const panels = [{ label: `${s.name}: ${conditionText(s.conditions)}`, layers: [layer(s.volume)] }];
  const choices = [];
  const where = (c) => (c.same_space ? "" : " (not on the sample's grid in world space: the dataset is not registered, "
                                             + "each scan keeps its own position)");
  if (s.nearest && viewable(s.nearest.volume)) choices.push({ what: "nearest training volume", v: s.nearest.volume,
    same: s.nearest.same_space, label: `nearest training volume: ${s.nearest.name}`
      + (s.nearest.ssim !== undefined ? ` (SSIM ${fmt(s.nearest.ssim)})` : "") + where(s.nearest) });
  if (s.same_age && viewable(s.same_age.volume)) choices.push({ what: `real ${s.same_age.split} scan`, v: s.same_age.volume,
    same: s.same_age.same_space, label: `real ${s.same_age.split} scan like it: ${s.same_age.name} `
      + `(${s.same_age.description})${where(s.same_age)}` });
  return { panels, choices };
}
function openSample(s, mode) {
  const { panels, choices } = sampleViews(s);
  // an overlay only where the two share the world grid: it then shows the same anatomy voxel by voxel
  const overlay = choices.find((c) => c.same);
  mode = mode || (choices.length ? "beside" : "alone");
  if (mode === "beside") for (const c of choices) panels.push({ label: c.label, layers: [layer(c.v)] });
  if (mode === "overlay" && overlay) {
    panels[0].layers.push(layer(overlay.v, { colormap: "red", opacity: 0.45 }));
    panels[0].label += ` + ${overlay.label} (red)`;
  }
  const modes = { alone: "sample alone", beside: "beside real volumes" };
  if (overlay) modes.overlay = `overlaid on the ${overlay.what} (red)`;
  const select = choices.length ? $("select", { onchange: (e) => openSample(s, e.target.value) },
    Object.entries(modes).map(([m, text]) => $("option", { value: m, selected: m === mode ? true : null }, text)))
    : null;
  return openViewer(`${s.name}: ${conditionText(s.conditions)}`, panels, select);
}

function samplesPage() {
  const groups = DATA.samples.groups;
  main.append($("p", { class: "note" }, DATA.samples.summary));
  for (const g of groups) {
    const cards = g.samples.map((s) => $("div", { class: `card${s.flagged ? " flagged" : ""}${viewable(s.volume) ? "" : " inert"}`, "data-name": s.name,
                                                  onclick: viewable(s.volume) ? opener(s.name, () => openSample(s)) : null },
      s.png ? $("img", { src: s.png, alt: s.name, loading: "lazy" }) : null,
      $("div", { class: "name" }, s.name),
      $("div", { class: "cond" }, conditionText(s.conditions)),
      s.nearest ? $("div", { class: "cond" }, `nearest training: ${s.nearest.name}`
        + (s.nearest.ssim !== undefined ? ` (SSIM ${fmt(s.nearest.ssim)})` : "")) : null));
    section(`${g.folder} (${g.samples.length} samples${g.note ? `; ${g.note}` : ""})`, $("div", { class: "grid" }, cards));
  }
}

function evaluationPage() {
  const e = DATA.evaluation;
  main.append($("p", { class: "note" }, e.summary));
  section("Verdicts", table(["question", "result", "yardstick", "reading"].map((key) => ({ key })),
                            e.verdicts.map((v) => ({ ...v }))));
  if (e.flagged.length) {
    section(`Flagged samples (${e.flagged.length}): click to see each beside its nearest training volume`,
      table([{ key: "name" }, { key: "why" }, { key: "nearest" }, { key: "ssim", numeric: true }],
            e.flagged.map((s) => ({ ...s, nearest: s.nearest ? s.nearest.name : "", ssim: s.nearest ? s.nearest.ssim : "",
                                    _class: "flagged", _open: viewable(s.volume) ? opener(s.name, () => openSample(s, "beside")) : null }))));
  } else if (e.has_samples) section("Flagged samples", $("p", {}, "none"));
  for (const t of e.tables) {
    section(t.title, table(t.columns, t.rows.map((r) => ({ ...r, _class: r._flag ? "flagged" : null,
                                                          _open: viewable(r.volume) ? opener(r.name, () => openSample(r, "beside")) : null }))));
  }
  section("Plots", figures(e.figures));
}

function indexPage() {
  section("Pages", $("ul", {}, DATA.index.pages.map((p) => $("li", {},
    p.href ? $("a", { href: p.href }, p.title) : p.title, ` ${p.kind}: `, p.summary))));
}

document.title = DATA.title;
({ dataset: datasetPage, run: runPage, samples: samplesPage, evaluation: evaluationPage, index: indexPage })[DATA.kind]();
for (const n of DATA.notes || []) document.querySelector(".sub").after($("p", { class: "warning" }, n));
openFromLink();
window.addEventListener("hashchange", openFromLink);  // a link pasted into the address bar of the open page
