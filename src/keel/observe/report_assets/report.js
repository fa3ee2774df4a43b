// keel report: draws every plot of the page as inline SVG from the JSON in #keel-data. No library, no network.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd"];
  const SEVERITY = {failure: "#c62828", warning: "#e08a00", info: "#78909c", test: "#b0bec5"};
  const HEIGHT = 250;
  const MARGIN = {l: 62, r: 14, t: 10, b: 38};
  const data = JSON.parse(document.getElementById("keel-data").textContent);
  const modes = ["step", "tokens", "time"].filter(function (m) { return data.axes[m]; });
  let mode = modes.indexOf(location.hash.slice(1)) >= 0 ? location.hash.slice(1) : "step";
  const hidden = {};  // panel id -> {series name: true} the reader switched off in the legend

  function svg(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    const a = Math.abs(v);
    if (a >= 1e9) return +(v / 1e9).toPrecision(3) + "G";
    if (a >= 1e6) return +(v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
    if (a !== 0 && a < 1e-3) return v.toExponential(1);
    return String(+v.toPrecision(4));
  }

  function timeUnit(span) {  // seconds -> the unit that keeps the axis' numbers small
    if (span < 180) return [1, "seconds"];
    if (span < 3 * 3600) return [60, "minutes"];
    if (span < 3 * 86400) return [3600, "hours"];
    return [86400, "days"];
  }

  function ticks(lo, hi, count) {
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(function (m) { return m * mag; }).find(function (s) { return s >= raw; });
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function logTicks(lo, hi) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      [1, 2, 5].forEach(function (m) {
        const v = m * Math.pow(10, e);
        if (v >= lo && v <= hi && (m === 1 || Math.log10(hi / lo) < 2)) out.push(v);
      });
    }
    return out.length >= 2 ? out : [lo, hi];
  }

  function extent(values, log, pad) {
    let lo = Infinity, hi = -Infinity;
    values.forEach(function (v) {
      if (v !== null && isFinite(v) && (!log || v > 0)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    });
    if (lo === Infinity) return null;
    if (log) {  // a little room above and below, in log space
      const room = Math.pow(hi / lo, 0.04) || 1;
      return hi === lo ? [lo / 2, hi * 2] : [lo / room, hi * room];
    }
    if (hi === lo) return [lo - (Math.abs(lo) * 0.05 || 1), hi + (Math.abs(hi) * 0.05 || 1)];
    return pad ? [lo - (hi - lo) * 0.04, hi + (hi - lo) * 0.04] : [lo, hi];
  }

  // The points of a panel's visible series on the current x axis, stacked ones summed.
  function layout(panel) {
    const xs = data.axes[mode];
    const off = hidden[panel.id] || {};
    const base = [];
    return panel.series.map(function (s, k) {
      const colour = s.colour || PALETTE[k % PALETTE.length];
      if (off[s.name]) return {s: s, colour: colour, pts: [], hidden: true};
      const pts = s.i.map(function (row, j) {
        const y = s.y[j];
        if (!panel.stacked) return [xs[row], y, y];
        const below = base[j] || 0;
        base[j] = below + (y || 0);
        return [xs[row], base[j], below];
      });
      return {s: s, colour: colour, pts: pts, hidden: false};
    });
  }

  function draw(panel, box) {
    box.textContent = "";
    const width = Math.max(300, box.clientWidth);
    const lines = layout(panel);
    const all = [].concat.apply([], lines.map(function (l) { return l.pts; }));
    const log = panel.log && all.some(function (p) { return p[1] > 0; });
    const xr = extent(all.map(function (p) { return p[0]; }), false, false);
    const yr = extent(all.map(function (p) { return p[1]; }).concat(panel.stacked ? [0] : []), log, !panel.stacked);
    const root = svg("svg", {width: width, height: HEIGHT, viewBox: "0 0 " + width + " " + HEIGHT, role: "img",
      "aria-label": panel.title}, box);
    if (!xr || !yr) {
      svg("text", {x: width / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "empty"}, root).textContent =
        "nothing to draw on this axis";
      return;
    }
    const [tdiv, tname] = mode === "time" ? timeUnit(xr[1] - xr[0]) : [1, ""];
    const pw = width - MARGIN.l - MARGIN.r, ph = HEIGHT - MARGIN.t - MARGIN.b;
    const X = function (v) { return MARGIN.l + (v - xr[0]) / (xr[1] - xr[0]) * pw; };
    const Y = log ? function (v) {
      return MARGIN.t + ph - (Math.log(v) - Math.log(yr[0])) / (Math.log(yr[1]) - Math.log(yr[0])) * ph;
    } : function (v) { return MARGIN.t + ph - (v - yr[0]) / (yr[1] - yr[0]) * ph; };
    const grid = svg("g", {class: "grid"}, root);
    (log ? logTicks(yr[0], yr[1]) : ticks(yr[0], yr[1], 5)).forEach(function (v) {
      svg("line", {x1: MARGIN.l, x2: MARGIN.l + pw, y1: Y(v), y2: Y(v)}, grid);
      svg("text", {x: MARGIN.l - 6, y: Y(v) + 4, "text-anchor": "end"}, grid).textContent = fmt(v);
    });
    ticks(xr[0] / tdiv, xr[1] / tdiv, Math.max(2, Math.floor(pw / 90))).forEach(function (v) {
      svg("line", {x1: X(v * tdiv), x2: X(v * tdiv), y1: MARGIN.t, y2: MARGIN.t + ph}, grid);
      svg("text", {x: X(v * tdiv), y: MARGIN.t + ph + 16, "text-anchor": "middle"}, grid).textContent = fmt(v);
    });
    const axisName = mode === "time" ? tname + " since the run began" : mode === "tokens" ? "tokens seen" : "step";
    svg("text", {x: MARGIN.l + pw / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis"}, root).textContent = axisName;
    svg("text", {x: 12, y: MARGIN.t + ph / 2, "text-anchor": "middle", class: "axis",
      transform: "rotate(-90 12 " + (MARGIN.t + ph / 2) + ")"}, root).textContent = panel.unit + (log ? " (log)" : "");
    const marks = svg("g", {class: "markers"}, root);
    data.markers.forEach(function (m) {
      const v = m[mode];
      if (v === null || v < xr[0] || v > xr[1]) return;
      const line = svg("line", {x1: X(v), x2: X(v), y1: MARGIN.t, y2: MARGIN.t + (m.tick ? 8 : ph),
        stroke: SEVERITY[m.severity], class: m.tick ? "tick" : ""}, marks);
      svg("title", {}, line).textContent = m.text;
    });
    const clip = "clip-" + panel.id;
    // The data may reach a little past the plot area, so a point on its edge is drawn whole.
    svg("rect", {x: MARGIN.l - 4, y: MARGIN.t - 4, width: pw + 8, height: ph + 8}, svg("clipPath", {id: clip}, root));
    const plot = svg("g", {"clip-path": "url(#" + clip + ")"}, root);
    lines.forEach(function (l) {
      if (l.hidden) return;
      const ok = l.pts.filter(function (p) { return p[1] !== null && (!log || p[1] > 0); });
      if (l.s.style === "area") {
        const top = ok.map(function (p) { return X(p[0]) + "," + Y(p[1]); });
        const bottom = ok.slice().reverse().map(function (p) { return X(p[0]) + "," + Y(Math.max(p[2], yr[0])); });
        svg("polygon", {points: top.concat(bottom).join(" "), fill: l.colour, "fill-opacity": 0.75}, plot);
        return;
      }
      const missing = function (p) { return !p || p[1] === null || (log && p[1] <= 0); };
      if (l.s.style !== "undone") {
        let d = "", pen = "M";
        l.pts.forEach(function (p) {
          if (missing(p)) { pen = "M"; return; }
          d += pen + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1);
          pen = "L";
        });
        svg("path", {d: d, fill: "none", stroke: l.colour, "stroke-width": 1.6}, plot);
      }
      const few = ok.length < 40 || l.s.style === "undone";
      l.pts.forEach(function (p, j) {  // every point when there are few; else those a gap leaves alone
        if (missing(p) || !(few || (missing(l.pts[j - 1]) && missing(l.pts[j + 1])))) return;
        svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: l.s.style === "undone" ? 3 : 2.2, fill: l.colour,
          "fill-opacity": l.s.style === "undone" ? 0.45 : 1}, plot);
      });
    });
    hover(root, box, lines, X, xr, pw, tdiv, tname);
  }

  function hover(root, box, lines, X, xr, pw, tdiv, tname) {
    const guide = svg("line", {class: "guide", y1: MARGIN.t, y2: HEIGHT - MARGIN.b, visibility: "hidden"}, root);
    const tip = document.createElement("div");
    tip.className = "tip";
    box.appendChild(tip);
    const area = svg("rect", {x: MARGIN.l, y: MARGIN.t, width: pw, height: HEIGHT - MARGIN.t - MARGIN.b,
      fill: "transparent"}, root);
    area.addEventListener("mousemove", function (ev) {
      const px = ev.clientX - root.getBoundingClientRect().left;
      const x = xr[0] + (px - MARGIN.l) / pw * (xr[1] - xr[0]);
      let rows = [];
      lines.forEach(function (l) {
        let best = null;
        l.pts.forEach(function (p) { if (best === null || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p; });
        if (best) rows.push([l, best]);
      });
      if (!rows.length) return;
      const at = rows[0][1][0];
      const label = mode === "time" ? fmt(at / tdiv) + " " + tname : mode + " " + fmt(at);
      tip.textContent = "";
      const head = document.createElement("b");
      head.textContent = label;
      tip.appendChild(head);
      rows.forEach(function (r) {
        const line = document.createElement("div");
        const y = r[1][2] === r[1][1] ? r[1][1] : r[1][1] - r[1][2];
        line.innerHTML = '<i style="background:' + r[0].colour + '"></i>';
        line.appendChild(document.createTextNode(r[0].s.name + ": " + fmt(y)));
        tip.appendChild(line);
      });
      guide.setAttribute("x1", X(at));
      guide.setAttribute("x2", X(at));
      guide.setAttribute("visibility", "visible");
      tip.style.display = "block";
      tip.style.left = Math.min(px + 12, box.clientWidth - tip.offsetWidth - 4) + "px";
    });
    area.addEventListener("mouseleave", function () {
      tip.style.display = "none";
      guide.setAttribute("visibility", "hidden");
    });
  }

  function legend(panel, list, redraw) {
    list.textContent = "";
    panel.series.forEach(function (s, k) {
      const item = document.createElement("li");
      const last = s.y.filter(function (v) { return v !== null; }).pop();
      item.innerHTML = '<i style="background:' + (s.colour || PALETTE[k % PALETTE.length]) + '"></i>';
      item.appendChild(document.createTextNode(s.name + (last === undefined ? "" : " " + fmt(last))));
      item.title = "click to show or hide";
      if ((hidden[panel.id] || {})[s.name]) item.className = "off";
      item.addEventListener("click", function () {
        const off = hidden[panel.id] = hidden[panel.id] || {};
        off[s.name] = !off[s.name];
        item.className = off[s.name] ? "off" : "";
        redraw();
      });
      list.appendChild(item);
    });
  }

  // Runs one panel's part of the page; a panel that fails says so in its place and the others still draw.
  function guarded(panel, work) {
    const box = document.getElementById("panel-" + panel.id).querySelector(".chart");
    try {
      work(box);
    } catch (e) {
      box.textContent = "This plot could not be drawn: " + e.message;
      console.error("keel report: panel " + panel.id + ": " + e.message);
    }
  }

  function drawAll() {
    data.panels.forEach(function (panel) { guarded(panel, function (box) { draw(panel, box); }); });
  }

  const switcher = document.getElementById("xaxis");
  modes.forEach(function (m) {
    const button = document.createElement("button");
    button.textContent = {step: "step", tokens: "tokens", time: "wall time"}[m];
    button.dataset.mode = m;
    button.addEventListener("click", function () {
      mode = m;
      history.replaceState(null, "", "#" + m);
      switcher.querySelectorAll("button").forEach(function (b) { b.className = b.dataset.mode === mode ? "on" : ""; });
      drawAll();
    });
    button.className = m === mode ? "on" : "";
    switcher.appendChild(button);
  });
  data.panels.forEach(function (panel) {
    guarded(panel, function (box) {
      legend(panel, box.parentNode.querySelector(".legend"), function () {
        guarded(panel, function (again) { draw(panel, again); });
      });
    });
  });
  drawAll();
  let pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(drawAll, 150);
  });
})();
