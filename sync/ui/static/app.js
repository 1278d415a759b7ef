// vectorsync UI: live status, the map and the training curves. Every value from the database is
// set through textContent or handed to plotly escaped; HTML fragments come escaped from the server.
"use strict";

function escapeText(value) {
  return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

document.querySelectorAll("select.auto-submit").forEach((select) => {
  select.addEventListener("change", () => select.form.submit());
});

const status = document.getElementById("status");
if (status) {
  setInterval(async () => {
    const response = await fetch(status.dataset.refresh);
    if (response.ok) status.innerHTML = await response.text();
  }, 2000);
}

const map = document.getElementById("map");
if (map) drawMap(map);

async function drawMap(element) {
  const name = element.dataset.name;
  const method = (document.querySelector("select[name=method]") || {}).value || "pca";
  const params = new URLSearchParams({ method });
  if (element.dataset.color) params.set("color", element.dataset.color);
  const response = await fetch(`/api/map/${encodeURIComponent(name)}?${params}`);
  if (!response.ok) {
    element.textContent = `the map could not be drawn: ${await response.text()}`;
    return;
  }
  const data = await response.json();
  const hoverText = data.keys.map((key, i) => `key ${escapeText(key)}` + (data.color.length ? ` · ${escapeText(data.color[i])}` : ""));
  const traces = [];
  const numeric = data.color.length && data.color.every((v) => v === null || typeof v === "number");
  const categories = [...new Set(data.color.map(String))].sort((a, b) => (numeric ? Number(a) - Number(b) : a.localeCompare(b)));
  // few distinct values (labels, even numeric ones) get a legend entry each; many numbers a colour scale
  if (data.color.length && categories.length <= (numeric ? 12 : 20)) {
    for (const category of categories) {
      const idx = data.keys.map((_, i) => i).filter((i) => String(data.color[i]) === category);
      traces.push({ type: "scatter", mode: "markers", name: escapeText(category), x: idx.map((i) => data.x[i]),
        y: idx.map((i) => data.y[i]), customdata: idx.map((i) => data.keys[i]), text: idx.map((i) => hoverText[i]),
        hoverinfo: "text", marker: { size: 6, opacity: 0.8 } });
    }
  } else {
    traces.push({ type: "scatter", mode: "markers", name: name, x: data.x, y: data.y, customdata: data.keys,
      text: hoverText, hoverinfo: "text",
      marker: numeric ? { size: 6, color: data.color, colorscale: "Viridis", showscale: true } : { size: 6, color: "#2b6cb0", opacity: 0.7 } });
  }
  await Plotly.newPlot(element, traces, { margin: { t: 20, r: 10, b: 30, l: 40 }, hovermode: "closest",
    xaxis: { title: { text: `${data.method.toUpperCase()} 1` } }, yaxis: { title: { text: `${data.method.toUpperCase()} 2` } } },
    { displaylogo: false, responsive: true });
  element.dataset.points = String(data.keys.length);
  const hover = { key: document.getElementById("hover-key"), thumb: document.getElementById("hover-thumb"), text: document.getElementById("hover-text") };
  let hovered = null;
  element.on("plotly_hover", async (event) => {
    const key = event.points[0].customdata;
    hovered = key;
    hover.key.textContent = `key ${key}`;
    const response = await fetch(`/api/row/${encodeURIComponent(name)}/${encodeURIComponent(key)}`);
    if (!response.ok || hovered !== key) return;
    const row = await response.json();
    hover.thumb.hidden = !row.thumbnail;
    if (row.thumbnail) hover.thumb.src = row.thumbnail;
    hover.text.textContent = row.snippet || (row.columns || []).map(([c, v]) => `${c} = ${v}`).join("\n");
  });
  element.on("plotly_click", (event) => {
    const key = event.points[0].customdata;
    window.location.href = `/explore?embedding=${encodeURIComponent(name)}&key=${encodeURIComponent(key)}`;
  });
}

const curves = document.getElementById("curves");
if (curves) drawCurves(curves);

async function drawCurves(element) {
  const response = await fetch(`/api/models/${encodeURIComponent(element.dataset.name)}`);
  if (!response.ok) return;
  const versions = (await response.json()).filter((v) => v.history && v.history.length);
  if (!versions.length) {
    element.textContent = "No training curve stored (pretrained model, graph, or a version trained before curves were kept).";
    element.style.height = "auto";
    return;
  }
  const traces = versions.reverse().map((v) => ({ type: "scatter", mode: "lines+markers", name: `v${v.version}`,
    x: v.history.map((p) => p.epoch), y: v.history.map((p) => p.loss) }));
  await Plotly.newPlot(element, traces, { margin: { t: 30, r: 10, b: 40, l: 60 }, title: { text: "training loss per epoch" },
    xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "loss" } } }, { displaylogo: false, responsive: true });
  element.dataset.curves = String(traces.length);
}
