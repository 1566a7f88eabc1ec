// Hand-drawn SVG line charts: no library, nothing fetched.

const NS = 'http://www.w3.org/2000/svg';
const W = 640;
const H = 200;
const PAD = { left: 52, right: 12, top: 12, bottom: 26 };

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// series: [{name, values: [number|null], cls}] all of the same length, oldest first.
// opts: label (for screen readers), format(y) for the axis, xLabel(i) for the time axis.
export function lineChart(svg, series, opts) {
  svg.replaceChildren();
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', opts.label);
  const n = series.length ? series[0].values.length : 0;
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const x0 = PAD.left;
  const x1 = W - PAD.right;
  const y0 = H - PAD.bottom;
  const y1 = PAD.top;
  const x = (i) => x0 + (n > 1 ? (i * (x1 - x0)) / (n - 1) : 0);
  const y = (v) => y0 - (v / max) * (y0 - y1);
  const grid = el('g', { class: 'grid' });
  for (let k = 0; k <= 4; k += 1) {
    const v = (max * k) / 4;
    grid.append(el('line', { x1: x0, x2: x1, y1: y(v), y2: y(v) }));
    grid.append(el('text', { x: x0 - 6, y: y(v) + 4, 'text-anchor': 'end' }, opts.format(v)));
  }
  for (let k = 0; k <= 3; k += 1) {
    const i = Math.round(((n - 1) * k) / 3);
    grid.append(el('text', { x: x(i), y: H - 6, 'text-anchor': k === 0 ? 'start' : k === 3 ? 'end' : 'middle' },
      opts.xLabel(i)));
  }
  svg.append(grid);
  if (!series.length) {
    svg.append(el('text', { x: (x0 + x1) / 2, y: (y0 + y1) / 2, 'text-anchor': 'middle', class: 'empty' },
      'no requests yet'));
    return;
  }
  for (const s of series) {
    let d = '';
    let pen = false;
    const dots = [];
    const missing = (v) => v === null || v === undefined;
    s.values.forEach((v, i) => {
      if (missing(v)) { pen = false; return; }
      if (!pen && missing(s.values[i + 1])) dots.push([x(i), y(v)]); // a lone point: no line to show it
      d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)} ${y(v).toFixed(1)} `;
      pen = true;
    });
    const g = el('g', { class: s.cls });
    const path = el('path', { d: d.trim() || 'M0 0', class: 'line' });
    path.append(el('title', {}, s.name));
    g.append(path);
    for (const [cx, cy] of dots) g.append(el('circle', { cx: cx.toFixed(1), cy: cy.toFixed(1), r: 3, class: 'dot' }));
    svg.append(g);
  }
}
