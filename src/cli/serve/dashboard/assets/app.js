// The dashboard page: renders the pool's snapshots as the server pushes them. Every text goes into
// the DOM with textContent (reasons are upstream text); nothing is ever parsed as HTML.
'use strict';
(function () {
  const token = new URLSearchParams(location.hash.slice(1)).get('token');
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';
  let latest = null;
  let receivedAt = 0;
  let historyOf = null;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function row(cells, className) {
    const tr = el('tr', null, className);
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el('td', cell));
    return tr;
  }
  function header(names) { return row(names.map((name) => el('th', name))); }
  // Now, as the server's clock sees it (the snapshot's time plus what passed since it came).
  function now() { return latest ? latest.at + (Date.now() - receivedAt) : Date.now(); }
  function span(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    if (s < 120) return s + ' s';
    if (s < 7200) return Math.round(s / 60) + ' min';
    if (s < 172800) return Math.round(s / 3600) + ' h';
    return Math.round(s / 86400) + ' d';
  }
  function relative(ms) { const d = ms - now(); return d >= 0 ? 'in ' + span(d) : span(d) + ' ago'; }
  function clock(ms) { return new Date(ms).toLocaleTimeString(); }
  function when(ms) { return clock(ms) + ' (' + relative(ms) + ')'; }

  function holderCell(key) {
    const td = el('td');
    const h = key.holder;
    if (!h) return td;
    td.appendChild(el('span', h.host + ' · pid ' + h.pid, 'mono'));
    if (h.locked_at) td.appendChild(el('div', 'since ' + clock(h.locked_at), 'muted'));
    if (h.liveness === 'dead') td.appendChild(el('div', 'dead: ' + (h.dead_because || 'gone'), 'state error'));
    return td;
  }
  function lockdownCell(key) {
    const td = el('td');
    for (const l of key.lockdowns || []) {
      const line = el('span', null, 'lockdown');
      line.appendChild(el('b', (l.model === '*' ? 'every model' : l.model) + ' until ' + when(l.until)));
      line.appendChild(el('span', ' — ' + l.reason + (l.quota_id && !l.reason.includes(l.quota_id) ? ' [' + l.quota_id + ']' : '')
        + ' (' + l.scope + ', set by ' + l.set_by_key + ')', 'why'));
      td.appendChild(line);
    }
    if (key.reason && key.state === 'error') {
      td.appendChild(el('span', key.reason, 'why'));
    }
    return td;
  }
  function group(key) {
    if (key.quota_group) return key.quota_group;
    if (key.project_learned) return '#' + key.project_learned + ' (learned)';
    return '';
  }

  function renderKeys(view) {
    const root = $('connectors');
    clear(root);
    const byConnector = new Map();
    for (const key of view.keys) {
      if (!byConnector.has(key.connector)) byConnector.set(key.connector, []);
      byConnector.get(key.connector).push(key);
    }
    if (!byConnector.size) root.appendChild(el('p', 'No keys in the database yet: they appear once a keyring is used.', 'muted'));
    for (const [connector, keys] of byConnector) {
      const counts = new Map();
      for (const key of keys) counts.set(key.state, (counts.get(key.state) || 0) + 1);
      const h2 = el('h2', connector);
      h2.appendChild(el('span', keys.length + ' keys: ' + [...counts].map(([s, n]) => n + ' ' + s).join(', '), 'summary'));
      root.appendChild(h2);
      const table = el('table', null, 'keys');
      table.appendChild(header(['key', 'fingerprint', 'group', 'state', 'holder', 'lockdowns by model', 'uses', 'last used']));
      for (const key of keys) {
        const tr = row([
          el('td', key.key, 'mono'), el('td', key.fingerprint, 'mono'), el('td', group(key)),
          el('td', key.state + (key.keyring ? ' (' + key.keyring + ')' : ''), 'state ' + key.state),
          holderCell(key), lockdownCell(key), el('td', key.uses, 'num'),
          el('td', key.last_used_at ? relative(key.last_used_at) : 'never', 'muted'),
        ], 'key');
        tr.dataset.key = key.connector + '/' + key.key;
        tr.title = 'Recent history of ' + key.key;
        tr.addEventListener('click', () => openHistory(key.connector, key.key));
        table.appendChild(tr);
      }
      root.appendChild(table);
    }
    const warnings = $('warnings');
    clear(warnings);
    for (const warning of view.warnings || []) warnings.appendChild(el('li', warning));
  }

  // The limits in use (declared in the keyring or learned from a 429), each with its window's usage:
  // one row per connector, quota scope and model.
  function renderUsage(view) {
    const limits = view.limits || [];
    $('usage-section').hidden = !limits.length;
    const table = $('usage');
    clear(table);
    if (!limits.length) return;
    table.appendChild(header(['connector', 'scope', 'model', 'window usage']));
    const rows = new Map();
    for (const l of limits) {
      const id = l.connector + ' ' + l.scope + ' ' + l.model;
      if (!rows.has(id)) {
        const cell = el('td');
        rows.set(id, cell);
        table.appendChild(row([el('td', l.connector), el('td', l.scope, 'mono'), el('td', l.model), cell]));
      }
      const line = el('div', null, 'limit');
      const meter = document.createElement('meter');
      meter.max = Math.max(l.count, 1);
      meter.value = Math.min(l.used, meter.max);
      meter.high = meter.max * 0.8;
      line.appendChild(meter);
      const unit = l.measure === 'tokens' ? ' tokens' : '';
      const source = l.source === 'learned' ? 'learned from ' + (l.quota_id || 'a 429') : l.source;
      let text = ' ' + l.used + '/' + l.count + unit + ' (' + l.limit + ', ' + source + ')';
      if (l.paced_until) text += ' — paced until ' + when(l.paced_until);
      line.appendChild(el('span', text));
      rows.get(id).appendChild(line);
    }
  }

  function renderActivity(activity) {
    const root = $('activity');
    clear(root);
    const buckets = Math.round(3600000 / activity.bucket_ms);
    const lines = new Map();
    let peak = 1;
    for (const r of activity.rows) {
      const id = r.connector + ' ' + r.name + ' ' + (r.model || '-');
      if (!lines.has(id)) lines.set(id, { r, bars: new Map(), total: { requests: 0, successes: 0, rate_limited: 0, errors: 0 } });
      const line = lines.get(id);
      line.bars.set(Math.round((r.bucket - activity.since) / activity.bucket_ms), r);
      for (const k of Object.keys(line.total)) line.total[k] += r[k];
      peak = Math.max(peak, r.requests);
    }
    if (!lines.size) { root.appendChild(el('p', 'No requests in the last hour.', 'muted')); return; }
    const grid = el('div', null, 'strip');
    for (const [, line] of lines) {
      const label = el('div');
      label.appendChild(el('span', line.r.name, 'mono'));
      label.appendChild(el('span', ' · ' + (line.r.model || '-'), 'muted'));
      label.title = line.r.connector;
      grid.appendChild(label);
      const svg = document.createElementNS(SVG, 'svg');
      svg.setAttribute('viewBox', '0 0 ' + buckets * 4 + ' 26');
      svg.setAttribute('preserveAspectRatio', 'none');
      for (const [i, b] of line.bars) {
        let y = 26;
        for (const [field, cls] of [['successes', 'ok'], ['rate_limited', 'rl'], ['errors', 'er']]) {
          const h = (b[field] / peak) * 24;
          if (!h) continue;
          y -= h;
          const rect = document.createElementNS(SVG, 'rect');
          rect.setAttribute('x', String(i * 4));
          rect.setAttribute('y', String(y));
          rect.setAttribute('width', '3');
          rect.setAttribute('height', String(h));
          rect.setAttribute('class', cls);
          const title = document.createElementNS(SVG, 'title');
          title.textContent = clock(b.bucket) + ': ' + b.successes + ' ok, ' + b.rate_limited + ' 429, ' + b.errors + ' errors';
          rect.appendChild(title);
          svg.appendChild(rect);
        }
      }
      grid.appendChild(svg);
      const t = line.total;
      grid.appendChild(el('div', t.requests + ' req · ' + t.rate_limited + ' 429 · ' + t.errors + ' err', 'muted num'));
    }
    root.appendChild(grid);
  }

  function render() {
    if (!latest) return;
    renderKeys(latest.view);
    renderUsage(latest.view);
    renderActivity(latest.activity);
    $('at').textContent = 'as of ' + clock(latest.at);
  }

  async function openHistory(connector, key) {
    historyOf = { connector, key };
    $('history-section').hidden = false;
    $('history-title').textContent = 'Recent history of ' + key + ' (' + connector + ')';
    const table = $('history');
    clear(table);
    // `name`, not `key`: the door strips `key=` from queries (a way clients send the gateway's token).
    const query = new URLSearchParams({ connector, name: key });
    try {
      const response = await fetch('history?' + query, { headers, cache: 'no-store' });
      if (!response.ok) throw new Error((await response.json()).error || response.status);
      const rows = await response.json();
      table.appendChild(header(['time', 'event', 'from', 'to', 'model', 'reason', 'status', 'pid']));
      for (const t of rows) {
        table.appendChild(row([clock(t.at), t.event, t.from || '-', t.to, t.model || '', t.reason, t.http_status || '', t.holder_pid || '']));
      }
      $('history-section').scrollIntoView();
    } catch (error) {
      table.appendChild(row(['The history could not be read: ' + error.message]));
    }
  }
  $('history-close').addEventListener('click', () => { historyOf = null; $('history-section').hidden = true; });

  function live(on, text) {
    const badge = $('live');
    badge.textContent = text;
    badge.className = on ? 'live' : 'live off';
  }
  function problem(text) {
    const box = $('problem');
    box.hidden = !text;
    box.textContent = text || '';
  }

  // Server-sent events read with fetch (EventSource cannot send the token); reconnects when cut.
  async function stream() {
    for (;;) {
      try {
        const response = await fetch('events', { headers, cache: 'no-store' });
        if (response.status === 401) {
          problem('This dashboard needs the gateway token: open it as ' + location.pathname + '#token=YOUR_TOKEN');
          live(false, 'no token');
          return;
        }
        if (!response.ok) throw new Error('HTTP ' + response.status);
        problem(null);
        live(true, 'live');
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const event = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = event.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
            if (!data) continue;
            latest = JSON.parse(data);
            receivedAt = Date.now();
            render();
          }
        }
      } catch (error) {
        problem('Lost the connection to the server (' + error.message + '); retrying.');
      }
      live(false, 'reconnecting…');
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  // Relative times move on between snapshots.
  setInterval(render, 5000);
  stream();
})();
