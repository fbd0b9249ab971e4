// Reachback console: a client of /api/v1 like any other. No framework, no build
// step; every value from the server is put on the page as text (textContent),
// never as markup, so nothing a user or an outsider typed can run here.
'use strict';

const state = { me: null, settings: null };

// ---- DOM helpers ---------------------------------------------------------

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'class') element.className = value;
    else if (value === true) element.setAttribute(name, '');
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function svg(tag, attributes, ...children) {
  const element = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, String(value));
  for (const child of children.flat(Infinity)) if (child) element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return element;
}

const canWrite = () => state.me && (state.me.role === 'admin' || state.me.role === 'superadmin');
const isSuper = () => state.me && state.me.role === 'superadmin';
const when = (time) => (time ? new Date(time).toLocaleString() : '');
const location3 = (place) => (place ? [place.city, place.state, place.country].filter(Boolean).join(', ') : '');

// ---- API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && problem.detail) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && state.me && state.me.csrf_token) headers['x-csrf-token'] = state.me.csrf_token;
  const response = await fetch('/api/v1' + path, { method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 204) return null;
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    if (response.status === 401 && state.me && !path.startsWith('/auth/')) {
      state.me = null;
      renderLogin('Your session has ended; sign in again.');
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

// ---- dialogs ---------------------------------------------------------------

function openDialog(title, content, buttons) {
  const dialog = h('dialog', { 'aria-labelledby': 'dialog-title' }, h('h2', { id: 'dialog-title' }, title), content, h('div', { class: 'actions' }, buttons));
  dialog.addEventListener('close', () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

function confirmDialog(title, message, confirmLabel) {
  return new Promise((resolve) => {
    let answered = false;
    const finish = (answer) => { answered = true; resolve(answer); dialog.close(); };
    const dialog = openDialog(title, h('p', {}, message), [
      h('button', { class: 'danger', type: 'button', 'data-test': 'confirm', onclick: () => finish(true) }, confirmLabel),
      h('button', { type: 'button', onclick: () => finish(false) }, 'Cancel'),
    ]);
    dialog.addEventListener('close', () => { if (!answered) resolve(false); });
  });
}

function showSecret(title, explanation, secret) {
  const copied = h('span', { role: 'status' });
  const dialog = openDialog(title, [h('p', {}, explanation), h('p', { class: 'secret', 'data-test': 'secret' }, secret), copied], [
    h('button', { type: 'button', onclick: async () => { try { await navigator.clipboard.writeText(secret); copied.textContent = 'Copied.'; } catch { copied.textContent = 'Copy failed; select the text instead.'; } } }, 'Copy'),
    h('button', { type: 'button', class: 'primary', onclick: () => dialog.close() }, 'Done'),
  ]);
}

function notice(message, kind) {
  return h('div', { class: 'notice' + (kind === 'error' ? ' error' : ''), role: kind === 'error' ? 'alert' : 'status' }, message);
}

/// A form in a dialog. `fields`: [{name, label, type, value, options, hint}]; errors
/// from the API are shown beside the field they name.
function formDialog(title, fields, submitLabel, submit) {
  const inputs = {};
  const errors = {};
  const general = h('div', { 'aria-live': 'polite' });
  const rows = fields.map((field) => {
    const id = 'f-' + field.name.replace(/\W/g, '-');
    let input;
    if (field.type === 'select') {
      input = h('select', { id, name: field.name }, field.options.map(([value, label]) => h('option', { value, selected: value === field.value }, label)));
    } else if (field.type === 'multiselect') {
      const chosen = field.value || [];
      input = h('select', { id, name: field.name, multiple: true, size: Math.min(6, Math.max(2, field.options.length)) },
        field.options.map(([value, label]) => h('option', { value, selected: chosen.includes(value) }, label)));
    } else if (field.type === 'checkbox') {
      input = h('input', { id, name: field.name, type: 'checkbox', checked: !!field.value });
    } else {
      input = h('input', { id, name: field.name, type: field.type || 'text', value: field.value === undefined || field.value === null ? '' : field.value, autocomplete: 'off' });
    }
    inputs[field.name] = input;
    errors[field.name] = h('p', { class: 'field-error', id: id + '-error', 'data-error-for': field.name });
    input.setAttribute('aria-describedby', id + '-error');
    return h('div', { class: 'field' }, h('label', { for: id }, field.label), input, field.hint ? h('small', {}, field.hint) : null, errors[field.name]);
  });
  const form = h('form', { novalidate: true }, general, rows);
  const dialog = openDialog(title, form, [
    h('button', { type: 'submit', class: 'primary', form: undefined, onclick: (event) => { event.preventDefault(); send(); } }, submitLabel),
    h('button', { type: 'button', onclick: () => dialog.close() }, 'Cancel'),
  ]);
  form.addEventListener('submit', (event) => { event.preventDefault(); send(); });
  async function send() {
    for (const slot of Object.values(errors)) slot.textContent = '';
    general.replaceChildren();
    const values = {};
    for (const [name, input] of Object.entries(inputs)) {
      if (input.multiple) values[name] = Array.from(input.selectedOptions).map((option) => option.value);
      else values[name] = input.type === 'checkbox' ? input.checked : input.value.trim();
    }
    try {
      await submit(values);
      dialog.close();
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      const list = error.problem.errors || [];
      let placed = false;
      for (const item of list) {
        const key = Object.keys(errors).find((name) => item.field === name || item.field.startsWith(name + '.') || name.endsWith('.' + item.field) || name === item.field.split('.').pop());
        if (key) { errors[key].textContent = item.message; placed = true; }
      }
      if (!placed) general.append(notice(error.message, 'error'));
    }
  }
  return dialog;
}

// ---- tables -----------------------------------------------------------------

/// A server-paged table: sort, filters (with saved filters), paging, column
/// choice, expandable rows, refresh. Nothing is loaded beyond the current page.
function dataTable(options) {
  const stored = JSON.parse(localStorage.getItem('columns:' + options.page) || 'null');
  const table = {
    page: 1,
    pageSize: 50,
    sort: options.sort || '',
    // a page opened from a link starts with that link's filters (#/flows?device_id=…)
    filters: { ...(options.filters || {}) },
    hidden: new Set(stored || options.columns.filter((column) => column.hidden).map((column) => column.key)),
    showFilters: true,
    expanded: new Set(),
    total: 0,
    rows: [],
  };
  const root = h('section', { class: 'table' });
  const status = h('div', { 'aria-live': 'polite' });
  const savedSelect = h('select', { 'aria-label': 'Saved filters', 'data-test': 'saved-filters' });

  table.query = () => {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(table.filters)) if (value) query.set(key, value);
    if (table.sort) query.set('sort', table.sort);
    return query;
  };

  async function loadSaved() {
    try {
      const saved = await api('GET', '/saved-filters?page=' + options.page);
      savedSelect.replaceChildren(h('option', { value: '' }, 'Saved filters…'), ...saved.items.map((item) => h('option', { value: item.query }, item.name)));
    } catch { /* saved filters are a convenience */ }
  }

  // the table says it is loading (aria-busy) until the rows are drawn, for
  // assistive technology and for tests that must not act on a table about to be redrawn
  async function load() {
    root.setAttribute('aria-busy', 'true');
    const query = table.query();
    query.set('page', table.page);
    query.set('page_size', table.pageSize);
    status.replaceChildren();
    try {
      const data = await api('GET', options.endpoint + '?' + query.toString());
      table.rows = data.items;
      table.total = data.total;
    } catch (error) {
      table.rows = [];
      table.total = 0;
      status.append(notice(error.message, 'error'));
    }
    draw();
    root.removeAttribute('aria-busy');
  }
  table.load = load;

  function header() {
    const visible = options.columns.filter((column) => !table.hidden.has(column.key));
    const heads = visible.map((column) => {
      const sortKey = column.sort;
      let ariaSort;
      if (sortKey && table.sort === sortKey) ariaSort = 'ascending';
      if (sortKey && table.sort === '-' + sortKey) ariaSort = 'descending';
      const label = sortKey
        ? h('button', { class: 'sort', type: 'button', onclick: () => { table.sort = table.sort === sortKey ? '-' + sortKey : sortKey; table.page = 1; load(); } }, column.label)
        : column.label;
      return h('th', { scope: 'col', 'aria-sort': ariaSort, 'data-column': column.key }, label);
    });
    const rows = [h('tr', {}, options.details ? h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Details')) : null, heads, options.actions ? h('th', { scope: 'col' }, 'Actions') : null)];
    if (table.showFilters) {
      const cells = visible.map((column) => {
        if (!column.filter) return h('td', {});
        const current = table.filters[column.filter] || '';
        const apply = (value) => { table.filters[column.filter] = value; table.page = 1; load(); };
        const control = column.choices
          ? h('select', { 'aria-label': 'Filter ' + column.label, 'data-filter': column.filter, onchange: (event) => apply(event.target.value) }, h('option', { value: '' }, 'any'), column.choices.map((choice) => h('option', { value: choice, selected: choice === current }, choice)))
          : h('input', { 'aria-label': 'Filter ' + column.label, 'data-filter': column.filter, value: current, placeholder: column.placeholder || 'filter', onchange: (event) => apply(event.target.value.trim()) });
        return h('td', {}, control);
      });
      rows.push(h('tr', { class: 'filters' }, options.details ? h('td', {}) : null, cells, options.actions ? h('td', {}) : null));
    }
    return h('thead', {}, rows);
  }

  function body() {
    const visible = options.columns.filter((column) => !table.hidden.has(column.key));
    const span = visible.length + (options.details ? 1 : 0) + (options.actions ? 1 : 0);
    if (table.rows.length === 0) return h('tbody', {}, h('tr', {}, h('td', { colspan: span }, 'Nothing matches.')));
    const rows = [];
    for (const row of table.rows) {
      const key = row[options.rowKey || 'id'];
      const open = table.expanded.has(key);
      rows.push(h('tr', { 'data-row': key },
        options.details ? h('td', {}, h('button', { type: 'button', 'aria-expanded': open ? 'true' : 'false', 'aria-label': 'Details', onclick: () => { if (open) table.expanded.delete(key); else table.expanded.add(key); draw(); } }, open ? '−' : '+')) : null,
        visible.map((column) => h('td', { class: column.numeric ? 'num' : undefined, 'data-column': column.key }, column.render ? column.render(row) : row[column.key] === null || row[column.key] === undefined ? '' : String(row[column.key]))),
        options.actions ? h('td', {}, h('div', { class: 'actions' }, options.actions(row, load))) : null));
      if (open) rows.push(h('tr', { class: 'details' }, h('td', { colspan: span }, options.details(row))));
    }
    return h('tbody', {}, rows);
  }

  function columnChooser() {
    return h('details', { class: 'columns' }, h('summary', {}, 'Columns'), h('div', {}, options.columns.map((column) =>
      h('label', {}, h('input', { type: 'checkbox', checked: !table.hidden.has(column.key), onchange: (event) => {
        if (event.target.checked) table.hidden.delete(column.key); else table.hidden.add(column.key);
        localStorage.setItem('columns:' + options.page, JSON.stringify([...table.hidden]));
        draw();
      } }), ' ', column.label))));
  }

  function draw() {
    const pages = Math.max(1, Math.ceil(table.total / table.pageSize));
    const toolbar = h('div', { class: 'toolbar' },
      options.toolbar ? options.toolbar(table) : null,
      h('span', { class: 'spacer' }),
      savedSelect,
      h('button', { type: 'button', 'data-test': 'save-filter', onclick: async () => {
        const query = table.query().toString();
        formDialog('Save filter', [{ name: 'name', label: 'Name' }], 'Save', async (values) => {
          await api('POST', '/saved-filters', { page: options.page, name: values.name, query });
          await loadSaved();
        });
      } }, 'Save filter'),
      h('button', { type: 'button', 'data-test': 'toggle-filters', onclick: () => { table.showFilters = !table.showFilters; draw(); } }, table.showFilters ? 'Hide filters' : 'Show filters'),
      columnChooser(),
      h('button', { type: 'button', 'data-test': 'refresh', onclick: load }, 'Refresh'));
    const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' },
      h('button', { type: 'button', disabled: table.page <= 1, onclick: () => { table.page -= 1; load(); } }, 'Previous'),
      h('span', { 'data-test': 'page-info' }, `Page ${table.page} of ${pages} · ${table.total.toLocaleString()} rows`),
      h('button', { type: 'button', disabled: table.page >= pages, onclick: () => { table.page += 1; load(); } }, 'Next'),
      h('label', {}, 'Rows per page ', h('select', { onchange: (event) => { table.pageSize = Number(event.target.value); table.page = 1; load(); } },
        [25, 50, 100, 250].map((size) => h('option', { value: size, selected: size === table.pageSize }, size)))));
    root.replaceChildren(toolbar, status, h('table', { 'data-test': options.page }, header(), body()), pager);
  }

  savedSelect.addEventListener('change', () => {
    const query = new URLSearchParams(savedSelect.value);
    table.filters = {};
    table.sort = options.sort || '';
    for (const [key, value] of query) {
      if (key === 'sort') table.sort = value; else table.filters[key] = value;
    }
    table.page = 1;
    load();
  });
  draw();
  loadSaved();
  load();
  return { element: root, table };
}

// ---- pages --------------------------------------------------------------------

const pages = {};

function utilisation(row) {
  const used = Number(row.used_ips);
  const total = Number(row.total_ips);
  const share = total > 0 ? Math.min(100, (used / total) * 100) : 0;
  const fill = h('span', {});
  // set through the CSSOM: the CSP allows no inline style attributes
  fill.style.width = share.toFixed(1) + '%';
  return h('span', {}, String(row.used_ips), h('span', { class: 'bar', role: 'img', 'aria-label': `${share.toFixed(1)}% used` }, fill));
}

function rangeForm(title, range, submitLabel, submit) {
  const place = (range && range.location) || {};
  return formDialog(title, [
    { name: 'name', label: 'Name', value: range && range.name },
    { name: 'range', label: 'IP range or subnet', value: range && range.range, hint: '100.64.0.0/16, fd7a:115c::/64 or 100.65.0.10-100.65.0.200' },
    { name: 'description', label: 'Description', value: range && range.description },
    { name: 'city', label: 'City', value: place.city },
    { name: 'state', label: 'State', value: place.state },
    { name: 'country', label: 'Country (ISO code)', value: place.country },
    { name: 'latitude', label: 'Latitude', value: place.latitude },
    { name: 'longitude', label: 'Longitude', value: place.longitude },
    { name: 'enabled', label: 'Enabled', type: 'checkbox', value: range ? range.enabled : true },
  ], submitLabel, (values) => {
    const location = {};
    for (const key of ['city', 'state', 'country']) if (values[key]) location[key] = values[key];
    for (const key of ['latitude', 'longitude']) if (values[key] !== '') location[key] = Number(values[key]);
    const body = { name: values.name, range: values.range, description: values.description, enabled: values.enabled, location: Object.keys(location).length ? location : null };
    return submit(body);
  });
}

pages.ranges = () => {
  let view;
  const reload = () => view.table.load();
  view = dataTable({
    page: 'ip-ranges',
    endpoint: '/ip-ranges',
    sort: 'name',
    columns: [
      { key: 'name', label: 'Name', sort: 'name', filter: 'name' },
      { key: 'range', label: 'IP Range or Subnet', sort: 'range', filter: 'range' },
      { key: 'city', label: 'City', filter: 'city', render: (row) => (row.location && row.location.city) || '' },
      { key: 'state', label: 'State', filter: 'state', render: (row) => (row.location && row.location.state) || '' },
      { key: 'country', label: 'Country', filter: 'country', render: (row) => (row.location && row.location.country) || '' },
      { key: 'total_ips', label: 'Total IPs', sort: 'total_ips', numeric: true },
      { key: 'used_ips', label: 'Used IPs', sort: 'used_ips', render: utilisation },
      { key: 'status', label: 'Status', sort: 'status', filter: 'status', choices: ['enabled', 'disabled'], render: (row) => h('span', { class: row.enabled ? 'status-enabled' : 'status-disabled' }, row.enabled ? 'Enabled' : 'Disabled') },
      { key: 'created_at', label: 'Created', sort: 'created_at', hidden: true, render: (row) => when(row.created_at) },
    ],
    toolbar: () => canWrite() ? h('button', { type: 'button', class: 'primary', 'data-test': 'add-range', onclick: () => rangeForm('Add IP range', null, 'Add', async (body) => { await api('POST', '/ip-ranges', body); reload(); }) }, 'Add range') : null,
    details: (row) => {
      const users = h('span', {}, '…');
      api('GET', `/stats/ranges/${row.id}/top-users`).then((data) => {
        users.textContent = data.items.map((item) => `${item.username} (${item.bindings})`).join(', ') || 'none yet';
      }).catch(() => { users.textContent = ''; });
      const place = row.location || {};
      return h('dl', {},
        h('dt', {}, 'Description'), h('dd', {}, row.description || '—'),
        h('dt', {}, 'Coordinates'), h('dd', {}, place.latitude !== undefined && place.latitude !== null ? `${place.latitude}, ${place.longitude}` : '—'),
        h('dt', {}, 'Created / updated'), h('dd', {}, `${when(row.created_at)} / ${when(row.updated_at)}`),
        h('dt', {}, 'Top users'), h('dd', { 'data-test': 'top-users' }, users));
    },
    actions: (row) => canWrite() ? [
      h('button', { type: 'button', onclick: () => rangeForm('Edit IP range', row, 'Save', async (body) => { await api('PATCH', '/ip-ranges/' + row.id, body); reload(); }) }, 'Edit'),
      h('button', { type: 'button', 'data-test': 'copy', onclick: () => rangeForm('Add IP range (copy of ' + row.name + ')', { ...row, name: row.name + ' copy' }, 'Add', async (body) => { await api('POST', '/ip-ranges', body); reload(); }) }, 'Copy'),
      row.enabled
        ? h('button', { type: 'button', 'data-test': 'disable', onclick: async () => { if (await confirmDialog('Disable range', `Disable ${row.name}? No new addresses will be assigned from it; existing bindings keep working.`, 'Disable')) { await api('POST', `/ip-ranges/${row.id}/disable`); reload(); } } }, 'Disable')
        : h('button', { type: 'button', 'data-test': 'enable', onclick: async () => { if (await confirmDialog('Enable range', `Enable ${row.name}? New addresses will be assigned from it.`, 'Enable')) { await api('POST', `/ip-ranges/${row.id}/enable`); reload(); } } }, 'Enable'),
      h('button', { type: 'button', class: 'danger', onclick: async () => {
        const bound = Number(row.used_ips);
        const message = bound > 0 ? `Delete ${row.name}? This releases its ${bound} binding(s); those devices get new addresses at their next connect.` : `Delete ${row.name}?`;
        if (await confirmDialog('Delete range', message, 'Delete')) { await api('DELETE', `/ip-ranges/${row.id}` + (bound > 0 ? '?force=true' : '')); reload(); }
      } }, 'Delete'),
    ] : [],
  });
  return [h('h1', {}, 'IP Ranges'), view.element];
};

// ---- binding history ----------------------------------------------------------

/// One history interval in a sentence: who, which machine, from when until when.
function describeInterval(row) {
  if (!row) return 'nobody';
  const until = row.released_at ? `${when(row.released_at)} (${row.reason.replace(/_/g, ' ')})` : 'now (still bound)';
  return `${row.username} on ${row.client_hostname} (${row.platform}, device ${row.device_id}), ${when(row.bound_at)} until ${until}`;
}

/// The Trace box: an address and an instant (a firewall or server log line) give the
/// device and user that held the address then, with the holders before and after.
function traceBox() {
  const address = h('input', { id: 'trace-ip', name: 'trace-ip', placeholder: '100.64.3.7', autocomplete: 'off', required: true, 'data-test': 'trace-ip' });
  const instant = h('input', { id: 'trace-at', name: 'trace-at', type: 'datetime-local', step: 1, 'data-test': 'trace-at' });
  const zone = h('select', { id: 'trace-zone', name: 'trace-zone', 'aria-label': 'Time zone of the date and time', 'data-test': 'trace-zone' },
    h('option', { value: 'local' }, 'local time'), h('option', { value: 'utc' }, 'UTC'));
  const result = h('div', { 'aria-live': 'polite', 'data-test': 'trace-result' });
  async function run(event) {
    event.preventDefault();
    result.replaceChildren();
    const query = new URLSearchParams({ ip: address.value.trim() });
    if (instant.value) {
      const moment = new Date(zone.value === 'utc' ? instant.value + 'Z' : instant.value);
      if (Number.isNaN(moment.getTime())) { result.append(notice('The date and time cannot be read.', 'error')); return; }
      query.set('at', moment.toISOString());
    }
    try {
      const trace = await api('GET', '/ip-bindings/history/trace?' + query.toString());
      result.replaceChildren(h('dl', { class: 'trace-answer' },
        h('dt', {}, `${trace.ip} at ${when(trace.at)} (${trace.at})`),
        h('dd', { 'data-test': 'trace-holder' }, trace.holder ? describeInterval(trace.holder) : 'Nobody held this address then.'),
        h('dt', {}, 'Before'), h('dd', { 'data-test': 'trace-previous' }, describeInterval(trace.previous)),
        h('dt', {}, 'After'), h('dd', { 'data-test': 'trace-next' }, describeInterval(trace.next))));
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      result.append(notice(error.message, 'error'));
    }
  }
  return h('form', { class: 'card trace', 'data-test': 'trace', novalidate: true, onsubmit: run },
    h('h2', {}, 'Trace an address'),
    h('p', {}, 'Who held a virtual IP at a given moment, and who held it before and after. Leave the time empty for now.'),
    h('div', { class: 'trace-fields' },
      h('label', { for: 'trace-ip' }, 'Virtual IP'), address,
      h('label', { for: 'trace-at' }, 'Date and time'), instant, zone,
      h('button', { type: 'submit', class: 'primary', 'data-test': 'trace-submit' }, 'Trace')),
    result);
}

/// The ten newest history intervals matching `filter` (an address or a device), as a small table.
function historyTable(filter, test) {
  const holder = h('div', { 'data-test': test }, 'Loading…');
  const query = new URLSearchParams(filter);
  query.set('page_size', '10');
  api('GET', '/ip-bindings/history?' + query.toString()).then((data) => {
    if (!data.items.length) { holder.replaceChildren('No history.'); return; }
    const head = ['Virtual IP', 'Username', 'Client Hostname', 'From', 'Until', 'Ended by'].map((label) => h('th', { scope: 'col' }, label));
    const rows = data.items.map((item) => h('tr', {},
      h('td', { 'data-column': 'ip' }, item.ip), h('td', { 'data-column': 'username' }, item.username), h('td', { 'data-column': 'client_hostname' }, item.client_hostname),
      h('td', { 'data-column': 'bound_at' }, when(item.bound_at)), h('td', { 'data-column': 'released_at' }, item.released_at ? when(item.released_at) : 'still bound'),
      h('td', { 'data-column': 'reason' }, item.reason ? item.reason.replace(/_/g, ' ') : '')));
    holder.replaceChildren(h('table', { class: 'history' }, h('thead', {}, h('tr', {}, head)), h('tbody', {}, rows)),
      data.total > data.items.length ? h('p', {}, `The newest ${data.items.length} of ${data.total.toLocaleString()}.`) : null);
  }).catch((error) => holder.replaceChildren(notice(error.message, 'error')));
  return holder;
}

pages.bindings = () => {
  const message = h('div', { 'aria-live': 'polite' });
  let view;
  view = dataTable({
    page: 'ip-bindings',
    endpoint: '/ip-bindings',
    sort: 'ip',
    rowKey: 'ip',
    columns: [
      { key: 'ip', label: 'Virtual IP', sort: 'ip', filter: 'ip' },
      { key: 'range_name', label: 'Range Name', sort: 'range_name', filter: 'range_name' },
      { key: 'range_location', label: 'Range Location', filter: 'range_location', render: (row) => location3(row.range_location) },
      { key: 'username', label: 'Username', sort: 'username', filter: 'username' },
      { key: 'platform', label: 'Platform', sort: 'platform', filter: 'platform', choices: ['windows', 'macos', 'linux', 'ios', 'android'] },
      { key: 'client_hostname', label: 'Client Hostname', sort: 'client_hostname', filter: 'client_hostname' },
      { key: 'last_updated', label: 'Last Updated', sort: 'last_updated', filter: 'updated_after', placeholder: 'after 2026-01-31T00:00:00Z', render: (row) => when(row.last_updated) },
    ],
    toolbar: (table) => h('button', { type: 'button', 'data-test': 'download-csv', onclick: async () => {
      message.replaceChildren();
      const settings = await api('GET', '/settings');
      const count = await api('GET', '/ip-bindings?page_size=1&' + table.query().toString());
      if (count.total > settings.export_limit) {
        message.append(notice(`${count.total.toLocaleString()} bindings match, more than the export limit of ${settings.export_limit.toLocaleString()}. Filter the table (by range, location or user) and download again.`, 'error'));
        return;
      }
      const link = h('a', { href: '/api/v1/ip-bindings/export.csv?' + table.query().toString(), download: 'ip-bindings.csv' });
      document.body.append(link);
      link.click();
      link.remove();
      message.append(notice(`Downloading ${count.total.toLocaleString()} bindings as CSV.`));
    } }, 'Download CSV'),
    details: (row) => h('div', { class: 'binding-details' },
      h('dl', {}, h('dt', {}, 'Device'), h('dd', {}, row.device_id), h('dt', {}, 'Range'), h('dd', {}, row.range_name)),
      h('h3', {}, `History of ${row.ip}`), historyTable({ ip: row.ip }, 'address-history'),
      h('h3', {}, 'Addresses this device held'), historyTable({ device_id: row.device_id }, 'device-history')),
    actions: (row, reload) => canWrite() ? [h('button', { type: 'button', class: 'danger', onclick: async () => {
      if (await confirmDialog('Release binding', `Release ${row.ip} (${row.client_hostname})? The address goes to quarantine and the device gets a new one at its next connect.`, 'Release')) { await api('DELETE', '/ip-bindings/' + row.ip); reload(); }
    } }, 'Release')] : [],
  });
  return [h('h1', {}, 'IP Bindings'), traceBox(), message, view.element];
};

function simpleList(title, options) {
  return () => [h('h1', {}, title), dataTable(options).element];
}

// ---- flow log ------------------------------------------------------------------

const VERDICTS = ['allowed', 'denied', 'offline', 'refused_by_agent', 'failed'];
const bytes = (count) => Number(count).toLocaleString();

/// The filters in the page's address (`#/flows?device_id=…`), for pages other pages link to.
function hashFilters() {
  const query = location.hash.split('?')[1];
  return query ? Object.fromEntries(new URLSearchParams(query)) : {};
}

/// A link to the flow log filtered to one device, newest first.
function flowsLink(deviceId, label) {
  return h('a', { href: '#/flows?' + new URLSearchParams({ device_id: deviceId }).toString(), 'data-test': 'flows-link' }, label || 'Flows');
}

/// One flow's decision in words: the verdict with the policy or the agent's reason.
function verdictText(row) {
  const verdict = row.verdict.replace(/_/g, ' ');
  if (row.verdict === 'denied') return `${verdict} (${row.policy_name || 'no policy allows it'})`;
  if (row.reason) return `${verdict} (${row.reason.replace(/_/g, ' ')})`;
  return verdict;
}

pages.flows = () => {
  const message = h('div', { 'aria-live': 'polite' });
  const initial = hashFilters();
  const view = dataTable({
    page: 'flows',
    endpoint: '/flows',
    sort: '',
    filters: initial,
    columns: [
      { key: 'started_at', label: 'Started', sort: 'started_at', filter: 'from', placeholder: 'from 2026-01-31T14:00:00Z', render: (row) => when(row.started_at) },
      { key: 'ended_at', label: 'Ended', sort: 'ended_at', filter: 'to', placeholder: 'to 2026-01-31T15:00:00Z', render: (row) => when(row.ended_at) },
      { key: 'verdict', label: 'Verdict', sort: 'verdict', filter: 'verdict', choices: VERDICTS, render: (row) => h('span', { class: 'verdict-' + row.verdict }, verdictText(row)) },
      { key: 'protocol', label: 'Protocol', sort: 'protocol', filter: 'protocol', choices: ['tcp', 'udp'] },
      { key: 'server_ip', label: 'Server', sort: 'server_ip', filter: 'server_ip', placeholder: 'address or CIDR', render: (row) => `${row.server_ip}:${row.server_port}` },
      { key: 'virtual_ip', label: 'Virtual IP', sort: 'virtual_ip', filter: 'virtual_ip', placeholder: 'address or CIDR', render: (row) => `${row.virtual_ip}:${row.virtual_port}` },
      { key: 'username', label: 'Username', sort: 'username', filter: 'username' },
      { key: 'client_hostname', label: 'Client Hostname', sort: 'client_hostname', filter: 'client_hostname' },
      { key: 'device_id', label: 'Device', filter: 'device_id', hidden: !initial.device_id },
      { key: 'connector_name', label: 'Connector', sort: 'connector_name', filter: 'connector_id', placeholder: 'connector id' },
      { key: 'bytes_to_client', label: 'Bytes to client', sort: 'bytes_to_client', numeric: true, render: (row) => bytes(row.bytes_to_client) },
      { key: 'bytes_from_client', label: 'Bytes from client', sort: 'bytes_from_client', numeric: true, render: (row) => bytes(row.bytes_from_client) },
      { key: 'node_name', label: 'Broker Node', hidden: true },
    ],
    details: (row) => h('dl', {},
      h('dt', {}, 'When'), h('dd', {}, `${row.started_at} – ${row.ended_at}`),
      h('dt', {}, 'Decision'), h('dd', {}, verdictText(row) + (row.policy_id ? ` · policy ${row.policy_id}` : '')),
      h('dt', {}, 'Client'), h('dd', {}, row.device_id ? `${row.username} on ${row.client_hostname} (${row.platform}, device ${row.device_id})` : 'no agent held the address'),
      h('dt', {}, 'Connector'), h('dd', {}, `${row.connector_name} (${row.connector_id})` + (row.socks_user ? ` · SOCKS5 user ${row.socks_user}` : '')),
      h('dt', {}, 'Bytes'), h('dd', {}, `${bytes(row.bytes_to_client)} to the client, ${bytes(row.bytes_from_client)} from it`)),
    toolbar: (table) => h('button', { type: 'button', 'data-test': 'download-csv', onclick: async () => {
      message.replaceChildren();
      const settings = await api('GET', '/settings');
      const count = await api('GET', '/flows?page_size=1&' + table.query().toString());
      if (count.total > settings.export_limit) {
        message.append(notice(`${count.total.toLocaleString()} flows match, more than the export limit of ${settings.export_limit.toLocaleString()}. Narrow the time window or filter by address, device or verdict, and download again.`, 'error'));
        return;
      }
      const link = h('a', { href: '/api/v1/flows/export.csv?' + table.query().toString(), download: 'flow-log.csv' });
      document.body.append(link);
      link.click();
      link.remove();
      message.append(notice(`Downloading ${count.total.toLocaleString()} flows as CSV.`));
    } }, 'Download CSV'),
  });
  return [h('h1', {}, 'Flow Log'),
    h('p', {}, 'Every flow a connector brought in: which server reached which client address and port, who held it then, what was decided, and the bytes each way. Newest first.'),
    message, view.element];
};

pages.sessions = simpleList('Client Sessions', {
  page: 'client-sessions', endpoint: '/client-sessions', sort: '',
  columns: [
    { key: 'virtual_ip', label: 'Virtual IP', sort: 'virtual_ip', filter: 'virtual_ip' },
    { key: 'client_hostname', label: 'Client Hostname', sort: 'client_hostname', filter: 'client_hostname' },
    { key: 'username', label: 'Username', sort: 'username', filter: 'username' },
    { key: 'platform', label: 'Platform', filter: 'platform' },
    { key: 'broker_node', label: 'Broker Node' },
    { key: 'remote_addr', label: 'Remote Address' },
    { key: 'connected_at', label: 'Connected Since', sort: 'connected_at', render: (row) => when(row.connected_at) },
    { key: 'flows', label: 'Recent Flows', render: (row) => flowsLink(row.device_id, 'Flows') },
  ],
  actions: (row, reload) => canWrite() ? [h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Disconnect', `Disconnect ${row.client_hostname}? The agent may reconnect.`, 'Disconnect')) { await api('DELETE', '/client-sessions/' + row.id); reload(); } } }, 'Disconnect')] : [],
});

pages.replicas = () => [
  h('h1', {}, 'Replicas'),
  h('p', {}, 'The server processes sharing this database. A replica without a heartbeat for 3 seconds is dead: its client sessions are deleted and its agents reconnect elsewhere. Dead replicas stay listed for a day.'),
  dataTable({
    page: 'replicas', endpoint: '/replicas', sort: '',
    columns: [
      { key: 'node_name', label: 'Node Name' },
      { key: 'status', label: 'Status', render: (row) => h('span', { class: 'status-' + row.status }, row.status) },
      { key: 'tunnel_endpoint', label: 'Tunnel Endpoint' },
      { key: 'client_sessions', label: 'Client Sessions' },
      { key: 'connectors', label: 'Connectors' },
      { key: 'flows', label: 'Open Flows' },
      { key: 'started_at', label: 'Started', render: (row) => when(row.started_at) },
      { key: 'last_heartbeat', label: 'Last Heartbeat', render: (row) => when(row.last_heartbeat) },
    ],
  }).element,
];

pages.devices = simpleList('Devices', {
  page: 'devices', endpoint: '/devices', sort: 'hostname',
  columns: [
    { key: 'hostname', label: 'Hostname', sort: 'hostname', filter: 'hostname' },
    { key: 'username', label: 'Username', sort: 'username', filter: 'username' },
    { key: 'platform', label: 'Platform', filter: 'platform', choices: ['windows', 'macos', 'linux', 'ios', 'android'] },
    { key: 'virtual_ip', label: 'Virtual IP' },
    { key: 'last_seen', label: 'Last Seen', sort: 'last_seen', render: (row) => when(row.last_seen) },
    { key: 'flows', label: 'Recent Flows', render: (row) => flowsLink(row.id, 'Flows') },
  ],
  actions: (row, reload) => canWrite() ? [h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Revoke device', `Revoke ${row.hostname}? Its certificate stops working, its address is released and its tunnel ends.`, 'Revoke')) { await api('DELETE', '/devices/' + row.id); reload(); } } }, 'Revoke')] : [],
});

pages.keys = () => {
  let view;
  view = dataTable({
    page: 'enrollment-keys', endpoint: '/enrollment-keys', sort: '',
    columns: [
      { key: 'username', label: 'Username', sort: 'username', filter: 'username' },
      { key: 'description', label: 'Description' },
      { key: 'reusable', label: 'Reusable', render: (row) => (row.reusable ? 'yes' : 'single use') },
      { key: 'used_count', label: 'Used', numeric: true },
      { key: 'hostname_pattern', label: 'Hostnames', render: (row) => row.hostname_pattern || 'any' },
      { key: 'expires_at', label: 'Expires', render: (row) => when(row.expires_at) || 'never' },
      { key: 'revoked', label: 'Status', render: (row) => (row.revoked ? 'revoked' : 'active') },
    ],
    toolbar: () => canWrite() ? h('button', { type: 'button', class: 'primary', 'data-test': 'add-key', onclick: () => formDialog('Create enrollment key', [
      { name: 'username', label: 'Username (the bindings carry it)' },
      { name: 'description', label: 'Description' },
      { name: 'reusable', label: 'Reusable', type: 'checkbox' },
      { name: 'expires_at', label: 'Expires (RFC 3339, optional)', hint: '2027-01-31T00:00:00Z' },
      { name: 'hostname_pattern', label: 'Hostnames it may enroll (optional)', hint: 'alice-pc.corp.example or *.laptops.corp.example' },
    ], 'Create', async (values) => {
      const body = { username: values.username, description: values.description, reusable: values.reusable, expires_at: values.expires_at || null };
      if (values.hostname_pattern) body.hostname_pattern = values.hostname_pattern;
      const created = await api('POST', '/enrollment-keys', body);
      view.table.load();
      showSecret('Enrollment key created', 'Copy the key now: it is shown only once.', created.key);
    }) }, 'Create key') : null,
    actions: (row, reload) => canWrite() && !row.revoked ? [h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Revoke key', 'Revoke this enrollment key? Devices enrolled with it keep working.', 'Revoke')) { await api('DELETE', '/enrollment-keys/' + row.id); reload(); } } }, 'Revoke')] : [],
  });
  return [h('h1', {}, 'Enrollment Keys'), view.element];
};

const splitList = (text) => text.split(',').map((item) => item.trim()).filter(Boolean);

pages.segments = () => {
  let view;
  const form = (title, row, label, send) => formDialog(title, [
    { name: 'name', label: 'Name', value: row && row.name },
    { name: 'destinations', label: 'Destinations', value: row && row.destinations.join(', '), hint: 'addresses, CIDRs or hostname patterns, comma-separated' },
    { name: 'tcp_ports', label: 'TCP ports', value: row && row.tcp_ports.join(', '), hint: '445, 5985-5986' },
    { name: 'udp_ports', label: 'UDP ports', value: row && row.udp_ports.join(', ') },
    { name: 'enabled', label: 'Enabled', type: 'checkbox', value: row ? row.enabled : true },
  ], label, async (values) => { await send({ name: values.name, destinations: splitList(values.destinations), tcp_ports: splitList(values.tcp_ports), udp_ports: splitList(values.udp_ports), enabled: values.enabled }); view.table.load(); });
  view = dataTable({
    page: 'app-segments', endpoint: '/app-segments', sort: 'name',
    columns: [
      { key: 'name', label: 'Name', sort: 'name', filter: 'name' },
      { key: 'destinations', label: 'Destinations', render: (row) => row.destinations.join(', ') },
      { key: 'tcp_ports', label: 'TCP Ports', render: (row) => row.tcp_ports.join(', ') },
      { key: 'udp_ports', label: 'UDP Ports', render: (row) => row.udp_ports.join(', ') },
      { key: 'enabled', label: 'Status', render: (row) => (row.enabled ? 'Enabled' : 'Disabled') },
    ],
    toolbar: () => canWrite() ? h('button', { type: 'button', class: 'primary', 'data-test': 'add-segment', onclick: () => form('Add segment', null, 'Add', (body) => api('POST', '/app-segments', body)) }, 'Add segment') : null,
    actions: (row, reload) => canWrite() ? [
      h('button', { type: 'button', onclick: () => form('Edit segment', row, 'Save', (body) => api('PATCH', '/app-segments/' + row.id, body)) }, 'Edit'),
      h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Delete segment', `Delete ${row.name}?`, 'Delete')) { try { await api('DELETE', '/app-segments/' + row.id); } catch (error) { alertError(error); } reload(); } } }, 'Delete'),
    ] : [],
  });
  return [h('h1', {}, 'Application Segments'), view.element];
};

function alertError(error) {
  openDialog('Not done', h('p', { role: 'alert' }, error.message), [h('button', { type: 'button', onclick: (event) => event.target.closest('dialog').close() }, 'Close')]);
}

pages.policies = () => {
  let view;
  const textLists = ['source_cidrs', 'usernames', 'platforms'];
  const labels = { source_cidrs: 'Server source CIDRs', usernames: 'Client usernames', platforms: 'Client platforms' };
  // segments, connectors and ranges are picked by name; the API stores their ids
  const choices = async () => {
    const [segments, connectors, ranges] = await Promise.all([api('GET', '/app-segments?page_size=1000'), api('GET', '/connectors?page_size=1000'), api('GET', '/ip-ranges?page_size=1000')]);
    return {
      segment_ids: segments.items.map((item) => [item.id, item.name]),
      connector_ids: connectors.items.map((item) => [item.id, item.name]),
      range_ids: ranges.items.map((item) => [item.id, `${item.name} (${item.range})`]),
    };
  };
  const form = async (title, row, label, send) => {
    const options = await choices();
    return formDialog(title, [
      { name: 'name', label: 'Name', value: row && row.name },
      { name: 'order', label: 'Order (lowest first; empty: last)', type: 'number', value: row && row.order },
      { name: 'action', label: 'Action', type: 'select', value: row ? row.action : 'allow', options: [['allow', 'Allow'], ['deny', 'Deny']] },
      { name: 'segment_ids', label: 'Application segments (none chosen: any)', type: 'multiselect', options: options.segment_ids, value: row && row.segment_ids },
      { name: 'connector_ids', label: 'Connectors (none chosen: any)', type: 'multiselect', options: options.connector_ids, value: row && row.connector_ids },
      { name: 'range_ids', label: 'Client IP ranges (none chosen: any)', type: 'multiselect', options: options.range_ids, value: row && row.range_ids },
      ...textLists.map((key) => ({ name: key, label: labels[key] + ' (comma-separated; empty = any)', value: row && row[key].join(', ') })),
      { name: 'enabled', label: 'Enabled', type: 'checkbox', value: row ? row.enabled : true },
    ], label, async (values) => {
      const body = { name: values.name, action: values.action, enabled: values.enabled, segment_ids: values.segment_ids, connector_ids: values.connector_ids, range_ids: values.range_ids };
      if (values.order !== '') body.order = Number(values.order);
      for (const key of textLists) body[key] = splitList(values[key]);
      await send(body);
      view.table.load();
    });
  };
  const segmentNames = {};
  api('GET', '/app-segments?page_size=1000').then((data) => {
    for (const item of data.items) segmentNames[item.id] = item.name;
    view.table.load();
  }).catch(() => {});
  const move = async (row, delta, reload) => { await api('PATCH', '/access-policies/' + row.id, { order: Math.max(0, row.order + delta) }); reload(); };
  view = dataTable({
    page: 'access-policies', endpoint: '/access-policies', sort: 'order',
    columns: [
      { key: 'order', label: 'Order', sort: 'order', numeric: true },
      { key: 'name', label: 'Name', sort: 'name', filter: 'name' },
      { key: 'action', label: 'Action' },
      { key: 'segment_ids', label: 'Segments', render: (row) => row.segment_ids.map((id) => segmentNames[id] || id).join(', ') || 'any' },
      { key: 'usernames', label: 'Users', render: (row) => row.usernames.join(', ') || 'any' },
      { key: 'source_cidrs', label: 'Sources', render: (row) => row.source_cidrs.join(', ') || 'any' },
      { key: 'enabled', label: 'Status', render: (row) => (row.enabled ? 'Enabled' : 'Disabled') },
    ],
    toolbar: () => canWrite() ? h('button', { type: 'button', class: 'primary', 'data-test': 'add-policy', onclick: () => form('Add policy', null, 'Add', (body) => api('POST', '/access-policies', body)) }, 'Add policy') : null,
    actions: (row, reload) => canWrite() ? [
      h('button', { type: 'button', 'aria-label': 'Move up', onclick: () => move(row, -1, reload) }, '↑'),
      h('button', { type: 'button', 'aria-label': 'Move down', onclick: () => move(row, 1, reload) }, '↓'),
      h('button', { type: 'button', onclick: async () => { await api('PATCH', '/access-policies/' + row.id, { enabled: !row.enabled }); reload(); } }, row.enabled ? 'Disable' : 'Enable'),
      h('button', { type: 'button', onclick: () => form('Edit policy', row, 'Save', (body) => api('PATCH', '/access-policies/' + row.id, body)) }, 'Edit'),
      h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Delete policy', `Delete ${row.name}?`, 'Delete')) { await api('DELETE', '/access-policies/' + row.id); reload(); } } }, 'Delete'),
    ] : [],
  });
  return [h('h1', {}, 'Access Policies'), h('p', {}, 'The first enabled policy that matches a flow decides; nothing matching means deny.'), view.element];
};

pages.connectors = () => {
  let view;
  view = dataTable({
    page: 'connectors', endpoint: '/connectors', sort: '',
    columns: [
      { key: 'name', label: 'Name', filter: 'name' },
      { key: 'status', label: 'Status', filter: 'status', choices: ['online', 'offline'], render: (row) => h('span', { class: 'status-' + row.status }, row.status) },
      { key: 'mode', label: 'Mode' },
      { key: 'dns_listeners', label: 'DNS', render: (row) => (row.dns_listeners || []).join(', ') },
      { key: 'version', label: 'Version' },
      { key: 'last_seen', label: 'Last Seen', render: (row) => when(row.last_seen) },
      { key: 'provisioning_key_expires_at', label: 'Provisioning Key', render: (row) => (row.provisioning_key_used_at && !row.provisioning_key_reusable ? 'used ' + when(row.provisioning_key_used_at) : 'valid until ' + when(row.provisioning_key_expires_at)) },
    ],
    toolbar: () => canWrite() ? h('button', { type: 'button', class: 'primary', onclick: () => formDialog('Add connector', [{ name: 'name', label: 'Name' }], 'Add', async (values) => {
      const created = await api('POST', '/connectors', { name: values.name });
      view.table.load();
      showSecret('Connector created', 'Its provisioning key, shown only once: reachback connector run --server URL --key KEY --mode tproxy', created.provisioning_key);
    }) }, 'Add connector') : null,
    actions: (row, reload) => canWrite() ? [h('button', { type: 'button', onclick: async () => { if (await confirmDialog('New provisioning key', `Issue ${row.name} a new provisioning key? Its current key stops working; the new one enrolls it once.`, 'Issue')) { const issued = await api('POST', '/connectors/' + row.id + '/provisioning-key', {}); reload(); showSecret('New provisioning key', 'Shown only once, valid until ' + when(issued.provisioning_key_expires_at) + ': reachback connector run --server URL --key KEY', issued.provisioning_key); } } }, 'New key'), h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Revoke connector', `Revoke ${row.name}? It is disconnected at once.`, 'Revoke')) { await api('DELETE', '/connectors/' + row.id); reload(); } } }, 'Revoke')] : [],
  });
  return [h('h1', {}, 'Connectors'), view.element];
};

pages.audit = () => {
  let view;
  view = dataTable({
    page: 'audit-logs', endpoint: '/audit-logs', sort: '',
    columns: [
      { key: 'at', label: 'When', sort: 'at', render: (row) => when(row.at) },
      { key: 'actor', label: 'Actor', filter: 'actor' },
      { key: 'action', label: 'Action', filter: 'action' },
      { key: 'resource_type', label: 'Resource', filter: 'resource_type' },
      { key: 'resource_id', label: 'Resource Id' },
      { key: 'source_ip', label: 'Source IP' },
    ],
    details: (row) => h('div', {}, h('h3', {}, 'Before'), h('pre', {}, JSON.stringify(row.before, null, 2)), h('h3', {}, 'After'), h('pre', {}, JSON.stringify(row.after, null, 2))),
    toolbar: (table) => h('a', { href: '/api/v1/audit-logs/export.csv?' + table.query().toString(), download: 'audit-log.csv', 'data-test': 'audit-csv' }, 'Download CSV'),
  });
  return [h('h1', {}, 'Audit Logs'), view.element];
};

pages.admins = () => {
  let view;
  view = dataTable({
    page: 'admins', endpoint: '/admins', sort: '',
    columns: [{ key: 'username', label: 'Username' }, { key: 'role', label: 'Role' }, { key: 'created_at', label: 'Created', render: (row) => when(row.created_at) }],
    toolbar: () => h('button', { type: 'button', class: 'primary', onclick: () => formDialog('Add administrator', [
      { name: 'username', label: 'Username' },
      { name: 'role', label: 'Role', type: 'select', value: 'viewer', options: [['viewer', 'Viewer'], ['admin', 'Admin'], ['superadmin', 'Superadmin']] },
      { name: 'password', label: 'Console password (optional)', type: 'password' },
    ], 'Add', async (values) => { await api('POST', '/admins', { username: values.username, role: values.role, password: values.password || undefined }); view.table.load(); }) }, 'Add administrator'),
    actions: (row, reload) => row.id === state.me.id ? [] : [h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Delete administrator', `Delete ${row.username}?`, 'Delete')) { await api('DELETE', '/admins/' + row.id); reload(); } } }, 'Delete')],
  });
  return [h('h1', {}, 'Administrators'), view.element];
};

pages['admin-sessions'] = simpleList('Admin Sessions', {
  page: 'admin-sessions', endpoint: '/admin-sessions', sort: '',
  columns: [
    { key: 'admin_username', label: 'Admin', filter: 'admin_username' },
    { key: 'api_key_name', label: 'API Key' },
    { key: 'client_ip', label: 'Client IP' },
    { key: 'active_since', label: 'Active Since', render: (row) => when(row.active_since) },
    { key: 'expires_at', label: 'Expires', render: (row) => when(row.expires_at) },
  ],
  actions: (row, reload) => [h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('End session', `End this session of ${row.admin_username}? It stops working at once.`, 'End')) { await api('DELETE', '/admin-sessions/' + row.id); reload(); } } }, 'End')],
});

pages['event-sinks'] = () => {
  let view;
  view = dataTable({
    page: 'event-sinks', endpoint: '/event-sinks', sort: '',
    columns: [
      { key: 'name', label: 'Name' },
      { key: 'kind', label: 'Kind' },
      { key: 'target', label: 'Target' },
      { key: 'event_types', label: 'Event Types', render: (row) => row.event_types.length ? row.event_types.join(', ') : '(all)' },
      { key: 'enabled', label: 'Enabled', render: (row) => row.enabled ? 'yes' : 'no' },
      { key: 'pending', label: 'Waiting', render: (row) => h('span', { 'data-test': 'sink-pending' }, String(row.pending)) },
      { key: 'oldest_pending_at', label: 'Oldest Waiting', render: (row) => when(row.oldest_pending_at) },
      { key: 'failures', label: 'Failures', render: (row) => h('span', { 'data-test': 'sink-failures', class: row.failures ? 'error' : '' }, String(row.failures)) },
      { key: 'last_error', label: 'Last Error', render: (row) => row.last_error || '' },
      { key: 'last_delivery_at', label: 'Last Delivery', render: (row) => when(row.last_delivery_at) },
      { key: 'delivered_total', label: 'Delivered' },
    ],
    toolbar: () => h('button', { type: 'button', class: 'primary', 'data-test': 'add-sink', onclick: () => formDialog('Add event sink', [
      { name: 'name', label: 'Name' },
      { name: 'kind', label: 'Kind', type: 'select', value: 'webhook', options: [['webhook', 'Webhook (HTTPS POST, CloudEvents, signed)'], ['syslog', 'Syslog (RFC 5424 over TCP or TLS)']] },
      { name: 'target', label: 'Target', hint: 'https://siem.example/hook, or tcp://host:514 / tls://host:6514 for syslog' },
      { name: 'event_types', label: 'Event type prefixes (optional)', hint: 'comma-separated, e.g. com.reachback.binding., com.reachback.device.' },
    ], 'Add', async (values) => {
      const types = values.event_types.split(',').map((text) => text.trim()).filter(Boolean);
      const created = await api('POST', '/event-sinks', { name: values.name, kind: values.kind, target: values.target, event_types: types });
      view.table.load();
      if (created.secret) {
        openDialog('Signing secret', [h('p', {}, 'Verify the webhook-signature header of each request with this secret (Standard Webhooks). It is not shown again.'), h('pre', { 'data-test': 'sink-secret' }, created.secret)],
          [h('button', { type: 'button', onclick: (event) => event.target.closest('dialog').close() }, 'Close')]);
      }
    }) }, 'Add sink'),
    actions: (row, reload) => [
      h('button', { type: 'button', onclick: async () => { try { await api('PATCH', '/event-sinks/' + row.id, { enabled: !row.enabled }); } catch (error) { alertError(error); } reload(); } }, row.enabled ? 'Disable' : 'Enable'),
      h('button', { type: 'button', class: 'danger', onclick: async () => { if (await confirmDialog('Remove sink', `Remove ${row.name}? Events waiting for it are dropped.`, 'Remove')) { await api('DELETE', '/event-sinks/' + row.id); reload(); } } }, 'Remove'),
    ],
  });
  return [h('h1', {}, 'Event Sinks'), view.element];
};

pages.settings = () => {
  const area = h('div', {}, 'Loading…');
  api('GET', '/settings').then((settings) => {
    const rows = [
      ['Client domains', settings.client_domains.join(', ') || '(any)'],
      ['Release quarantine', settings.release_quarantine_seconds + ' s'],
      ['Binding idle TTL', settings.binding_idle_ttl_seconds + ' s'],
      ['Export limit', settings.export_limit.toLocaleString() + ' rows'],
      ['Binding history kept', settings.binding_history_retention_days + ' days'],
      ['Flow log', settings.flow_log_enabled ? `on, kept ${settings.flow_log_retention_days} days` : 'off'],
    ];
    area.replaceChildren(h('dl', {}, rows.map(([name, value]) => [h('dt', {}, name), h('dd', {}, value)])),
      canWrite() ? h('button', { type: 'button', class: 'primary', onclick: () => formDialog('Settings', [
        { name: 'client_domains', label: 'Client domains (comma-separated)', value: settings.client_domains.join(', ') },
        { name: 'release_quarantine_seconds', label: 'Release quarantine (seconds)', type: 'number', value: settings.release_quarantine_seconds },
        { name: 'binding_idle_ttl_seconds', label: 'Binding idle TTL (seconds)', type: 'number', value: settings.binding_idle_ttl_seconds },
        { name: 'export_limit', label: 'Export limit (rows)', type: 'number', value: settings.export_limit },
        { name: 'flow_log_enabled', label: 'Record every flow in the flow log', type: 'checkbox', value: settings.flow_log_enabled },
        { name: 'flow_log_retention_days', label: 'Flow log kept (days)', type: 'number', value: settings.flow_log_retention_days },
      ], 'Save', async (values) => {
        await api('PATCH', '/settings', { client_domains: splitList(values.client_domains), release_quarantine_seconds: Number(values.release_quarantine_seconds), binding_idle_ttl_seconds: Number(values.binding_idle_ttl_seconds), export_limit: Number(values.export_limit), flow_log_enabled: values.flow_log_enabled, flow_log_retention_days: Number(values.flow_log_retention_days) });
        route();
      }) }, 'Change settings') : null);
  }).catch((error) => area.replaceChildren(notice(error.message, 'error')));
  return [h('h1', {}, 'Settings'), area];
};

pages.dashboard = () => {
  const utilisationCard = h('div', { class: 'card' }, h('h2', {}, 'Range utilisation'), 'Loading…');
  const platformCard = h('div', { class: 'card' }, h('h2', {}, 'Bindings by platform'), 'Loading…');
  const locationCard = h('div', { class: 'card' }, h('h2', {}, 'Bindings by country'), 'Loading…');
  const sessionsCard = h('div', { class: 'card' }, h('h2', {}, 'Live client sessions'), 'Loading…');
  const enrollmentsCard = h('div', { class: 'card' }, h('h2', {}, 'Enrollments, last 30 days'), 'Loading…');
  api('GET', '/stats/enrollments?days=30').then((data) => {
    const max = Math.max(1, ...data.days.map((day) => day.enrollments));
    const total = data.days.reduce((sum, day) => sum + day.enrollments, 0);
    const width = 10;
    const chart = svg('svg', { viewBox: `0 0 ${data.days.length * width} 104`, width: '100%', role: 'img', 'aria-label': `${total} enrollments in the last 30 days` },
      data.days.map((day, index) => {
        const height = (day.enrollments / max) * 100;
        return svg('rect', { x: index * width + 1, y: 102 - height, width: width - 2, height: Math.max(height, 0.5), fill: '#1f5fbf' }, svg('title', {}, `${day.date}: ${day.enrollments}`));
      }));
    enrollmentsCard.replaceChildren(h('h2', {}, 'Enrollments, last 30 days'), h('p', {}, `${total.toLocaleString()} in all`), chart);
  }).catch((error) => enrollmentsCard.append(notice(error.message, 'error')));
  const barChart = (pairs, label) => {
    const max = Math.max(1, ...pairs.map(([, value]) => value));
    const height = pairs.length * 22 + 4;
    return svg('svg', { viewBox: `0 0 240 ${height}`, width: '100%', role: 'img', 'aria-label': label },
      pairs.map(([name, value, text], index) => [
        svg('text', { x: 0, y: index * 22 + 15, 'font-size': 13 }, name.length > 12 ? name.slice(0, 11) + '…' : name),
        svg('rect', { x: 92, y: index * 22 + 4, width: Math.max(1, (value / max) * 100), height: 14, fill: '#1f5fbf' }, svg('title', {}, `${name}: ${text || value}`)),
        svg('text', { x: 198, y: index * 22 + 15, 'font-size': 13 }, text || String(value)),
      ]));
  };
  api('GET', '/ip-ranges?page_size=1000&sort=-used_ips').then((data) => {
    const top = data.items.slice(0, 12).map((row) => {
      const share = Number(row.total_ips) > 0 ? (Number(row.used_ips) / Number(row.total_ips)) * 100 : 0;
      return [row.name, share, (share > 0 && share < 1 ? share.toFixed(2) : share.toFixed(1)) + '%'];
    });
    const byCountry = {};
    for (const row of data.items) { const key = (row.location && row.location.country) || 'global'; byCountry[key] = (byCountry[key] || 0) + Number(row.used_ips); }
    utilisationCard.replaceChildren(h('h2', {}, 'Range utilisation (most used)'), top.length ? barChart(top, 'Share of addresses used per range') : 'No ranges yet.');
    const countries = Object.entries(byCountry).sort((a, b) => b[1] - a[1]).slice(0, 10);
    locationCard.replaceChildren(h('h2', {}, 'Bindings by country'), countries.length ? barChart(countries, 'Bindings per country') : 'No bindings yet.');
  }).catch((error) => utilisationCard.append(notice(error.message, 'error')));
  api('GET', '/stats/bindings').then((data) => {
    platformCard.replaceChildren(h('h2', {}, 'Bindings by platform'), barChart(data.by_platform.map((item) => [item.platform, item.bindings]), 'Bindings per platform'));
  }).catch((error) => platformCard.append(notice(error.message, 'error')));
  api('GET', '/client-sessions?page_size=5').then((data) => {
    sessionsCard.replaceChildren(h('h2', {}, 'Live client sessions'), h('p', { class: 'big' }, String(data.total)), h('ul', {}, data.items.map((item) => h('li', {}, `${item.virtual_ip} ${item.client_hostname}`))), h('a', { href: '#/sessions' }, 'All sessions'));
  }).catch((error) => sessionsCard.append(notice(error.message, 'error')));
  return [h('h1', {}, 'Dashboard'), h('div', { class: 'cards' }, utilisationCard, enrollmentsCard, platformCard, locationCard, sessionsCard)];
};

// ---- shell ---------------------------------------------------------------------

const NAV = [
  ['dashboard', 'Dashboard'], ['ranges', 'IP Ranges'], ['bindings', 'IP Bindings'], ['sessions', 'Client Sessions'], ['flows', 'Flow Log'], ['devices', 'Devices'],
  ['keys', 'Enrollment Keys'], ['segments', 'Application Segments'], ['policies', 'Access Policies'], ['connectors', 'Connectors'], ['replicas', 'Replicas'],
  ['audit', 'Audit Logs'], ['admins', 'Administrators', true], ['admin-sessions', 'Admin Sessions', true], ['event-sinks', 'Event Sinks', true], ['settings', 'Settings'],
];

function route() {
  if (!state.me) return;
  const name = (location.hash.replace(/^#\//, '') || 'dashboard').split('?')[0];
  const entry = NAV.find(([key]) => key === name) || NAV[0];
  const [key, , superOnly] = entry;
  const app = document.getElementById('app');
  const main = h('main', { id: 'main', tabindex: '-1' });
  app.replaceChildren(h('div', { class: 'layout' },
    h('header', { class: 'top' }, h('span', { class: 'brand' }, 'Reachback'),
      h('span', { 'data-test': 'whoami' }, `${state.me.username} (${state.me.role})`),
      h('button', { type: 'button', 'data-test': 'sign-out', onclick: signOut }, 'Sign out')),
    h('nav', { class: 'side', 'aria-label': 'Pages' }, NAV.filter(([, , onlySuper]) => !onlySuper || isSuper()).map(([navKey, label]) =>
      h('a', { href: '#/' + navKey, 'aria-current': navKey === key ? 'page' : undefined }, label))),
    main));
  if (superOnly && !isSuper()) { main.append(notice('This page is for superadmins.', 'error')); return; }
  main.append(...[pages[key]()].flat());
  document.title = `${entry[1]} · Reachback`;
}

async function signOut() {
  try { await api('POST', '/auth/logout'); } catch { /* the cookie is cleared either way */ }
  state.me = null;
  location.hash = '';
  renderLogin('Signed out.');
}

function renderLogin(message) {
  const error = h('div', { 'aria-live': 'assertive' }, message ? notice(message) : null);
  const username = h('input', { id: 'username', name: 'username', autocomplete: 'username', required: true });
  const password = h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const form = h('form', { class: 'login', 'aria-labelledby': 'login-title' },
    h('h1', { id: 'login-title' }, 'Sign in to Reachback'), error,
    h('div', { class: 'field' }, h('label', { for: 'username' }, 'Username'), username),
    h('div', { class: 'field' }, h('label', { for: 'password' }, 'Password'), password),
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.replaceChildren();
    try {
      const session = await api('POST', '/auth/login', { username: username.value, password: password.value });
      const me = await api('GET', '/me');
      state.me = { ...me, csrf_token: session.csrf_token };
      route();
    } catch (failure) {
      error.append(notice(failure.message, 'error'));
    }
  });
  document.getElementById('app').replaceChildren(form);
  username.focus();
}

async function boot() {
  try {
    state.me = await api('GET', '/me');
    route();
  } catch {
    renderLogin();
  }
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', boot);
