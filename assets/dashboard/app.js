// northstar's dashboard: plain calls to the server's own API with a key kept in this tab's
// sessionStorage and sent as `Authorization: Bearer` (no cookies). Every value is put in the
// page as text (textContent), never as HTML, so an event name cannot inject markup.
"use strict";

const KEY = "northstar-key";
const $ = (id) => document.getElementById(id);

function key() {
  return sessionStorage.getItem(KEY);
}

// A key handed over in the address (`#key=…`, never sent to a server) is kept and removed
// from the address at once.
function takeKeyFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const handed = params.get("key");
  if (handed) {
    sessionStorage.setItem(KEY, handed);
    params.delete("key");
    const view = params.get("view") || "overview";
    const customer = params.get("customer");
    const chosen = customer ? `&customer=${encodeURIComponent(customer)}` : "";
    history.replaceState(null, "", `${location.pathname}#${view}${chosen}`);
  }
}

async function api(path, body) {
  const init = { headers: { authorization: `Bearer ${key()}` } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(path, init);
  const text = await answer.text();
  if (answer.status === 401) {
    sessionStorage.removeItem(KEY);
    throw new Error("the key was refused: sign in again");
  }
  if (answer.status === 403) {
    throw new Error("this key may not do that (an analyst key reads; the admin key also acts)");
  }
  if (!answer.ok) {
    let message = text;
    try { message = JSON.parse(text).message || text; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${answer.status} ${message}`);
  }
  return text;
}

async function sql(statement) {
  return JSON.parse(await api("/v1/sql", { sql: statement })).rows;
}

// A value as a SQL string literal.
function literal(text) {
  return `'${String(text).replaceAll("'", "''")}'`;
}

function setText(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function fillTable(id, rows, columns, onClick) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const column of columns) {
      const td = document.createElement("td");
      td.textContent = row[column] === null || row[column] === undefined ? "" : String(row[column]);
      tr.append(td);
    }
    if (onClick) {
      tr.dataset.id = "1";
      tr.addEventListener("click", () => onClick(row));
    }
    body.append(tr);
  }
}

function showError(error) {
  setText("error", error ? error.message : "");
}

// Prometheus text → {name or name{labels}: value}.
function parseMetrics(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    samples[line.slice(0, at)] = Number(line.slice(at + 1));
  }
  return samples;
}

async function metrics() {
  const answer = await fetch("/metrics");
  return parseMetrics(await answer.text());
}

const today = () => new Date().toISOString().slice(0, 10);

async function overview() {
  const health = JSON.parse(await (await fetch("/healthz")).text());
  setText("health", health.status);
  const first = await metrics();
  const [events, rejected, reasons] = await Promise.all([
    sql(`SELECT count(*) AS n FROM events WHERE "timestamp" >= TIMESTAMP '${today()} 00:00:00'`),
    sql(`SELECT count(*) AS n FROM rejected_events WHERE received_at >= TIMESTAMP '${today()} 00:00:00'`),
    sql(`SELECT reasons, count(*) AS n FROM rejected_events WHERE received_at >= TIMESTAMP '${today()} 00:00:00' GROUP BY reasons ORDER BY n DESC LIMIT 20`),
  ]);
  setText("events-today", events[0].n);
  setText("rejected-today", rejected[0].n);
  fillTable("rejected-reasons", reasons, ["reasons", "n"]);
  const accepted = (m) => m["northstar_ingest_events_accepted_total"] || 0;
  const landed = (m) => m['northstar_archive_rows_total{table="events"}'] || 0;
  const last = (m) => m['northstar_archive_last_seq{table="events"}'];
  const visible = health.archive && health.archive.events ? health.archive.events.last_seq : null;
  const streamed = first["northstar_stream_last_seq"];
  setText("lag", streamed !== undefined && visible !== null ? Math.max(0, streamed - visible) : last(first));
  await new Promise((done) => setTimeout(done, 1000));
  const second = await metrics();
  setText("rate-in", Math.round(accepted(second) - accepted(first)));
  setText("rate-landed", Math.round(landed(second) - landed(first)));
}

async function latest(filters) {
  const where = [];
  if (filters.event) where.push(`event = ${literal(filters.event)}`);
  if (filters.user) where.push(`(user_id = ${literal(filters.user)} OR anonymous_id = ${literal(filters.user)})`);
  if (filters.customer) where.push(`customer_id = ${literal(filters.customer)}`);
  if (filters.since && /^\d{4}-\d{2}-\d{2}/.test(filters.since)) {
    where.push(`"timestamp" >= TIMESTAMP ${literal(filters.since.replace("T", " ").replace("Z", ""))}`);
  }
  const clause = where.length ? `WHERE ${where.join(" AND ")}` : "";
  const rows = await sql(
    `SELECT event_id, "timestamp" AS time, coalesce(event, type) AS event, coalesce(user_id, anonymous_id) AS user, customer_id AS customer FROM events ${clause} ORDER BY "timestamp" DESC LIMIT 50`,
  );
  fillTable("latest", rows, ["time", "event", "user", "customer"], (row) => detail(row.event_id).catch(showError));
}

async function detail(eventId) {
  const [event] = await sql(`SELECT * FROM events_resolved WHERE event_id = ${literal(eventId)}`);
  if (!event) return;
  for (const field of ["properties", "context"]) {
    try { event[field] = JSON.parse(event[field]); } catch (_) { /* kept as text */ }
  }
  $("event-json").textContent = JSON.stringify(event, null, 2);
  setText("person", event.person_id);
  const journey = await sql(
    `SELECT "timestamp" AS time, coalesce(event, type) AS event, coalesce(user_id, anonymous_id) AS id FROM events_resolved WHERE person_id = ${literal(event.person_id)} ORDER BY "timestamp" LIMIT 500`,
  );
  fillTable("journey", journey, ["time", "event", "id"]);
  $("detail").hidden = false;
}

async function usageOf(customer) {
  return JSON.parse(await api(`/v1/customers/${encodeURIComponent(customer)}/usage`));
}

// The share of its limit the most used feature has taken (null: no limited feature).
function nearest(usage) {
  const shares = usage.features.filter((f) => f.limit !== null && f.limit > 0).map((f) => Number(f.used) / Number(f.limit));
  return shares.length ? Math.max(...shares) : null;
}

async function customers(chosen) {
  const top = await sql(
    `SELECT customer_id, count(*) AS events FROM metered_events WHERE "timestamp" >= date_trunc('month', now()) GROUP BY customer_id ORDER BY events DESC, customer_id LIMIT 20`,
  );
  const rows = await Promise.all(
    top.map(async (row) => {
      const usage = await usageOf(row.customer_id);
      return {
        customer: row.customer_id,
        plan: usage.plan,
        events: row.events,
        nearest: percent(nearest(usage)) || "",
        suspended: usage.suspended ? usage.suspended.reason : "",
      };
    }),
  );
  fillTable("customer-list", rows, ["customer", "plan", "events", "nearest", "suspended"], (row) => {
    location.hash = `customers&customer=${encodeURIComponent(row.customer)}`;
  });
  if (chosen) await customer(chosen);
  await billing();
}

// Billing's standing: what is owed and delivered per customer and feature, and the dead
// letters with why each was refused.
async function billing() {
  let status;
  try {
    status = JSON.parse(await api("/v1/billing/status"));
  } catch (error) {
    setText("billing", error.message);
    $("billing-detail").hidden = true;
    return;
  }
  $("billing-detail").hidden = false;
  setText(
    "billing",
    `Provider ${status.provider}: ${status.pending} reports pending, ${status.delivered} delivered, ${status.dead.length} dead.`,
  );
  fillTable("billing-totals", status.totals, ["customer_id", "feature", "owed", "delivered"]);
  fillTable("billing-dead", status.dead, ["customer_id", "feature", "window_start", "value", "status", "message"]);
}

async function retryDead() {
  setText("billing-retried", "retrying…");
  try {
    const { requeued } = JSON.parse(await api("/v1/billing/retry", {}));
    setText("billing-retried", `${requeued} back in line`);
  } catch (error) {
    setText("billing-retried", error.message);
    return;
  }
  await billing();
}

async function customer(id) {
  const usage = await usageOf(id);
  setText("customer-name", `${id} (plan ${usage.plan}${usage.suspended ? `, suspended: ${usage.suspended.reason}` : ""})`);
  fillTable(
    "customer-usage",
    usage.features.map((f) => ({
      feature: f.feature,
      used: f.used,
      limit: f.limit === null ? "unlimited" : f.limit,
      remaining: f.remaining === null || f.remaining === undefined ? "" : f.remaining,
      share: f.limit ? percent(Number(f.used) / Number(f.limit)) : "",
      reached: f.projection && f.projection.limit_reached_at ? f.projection.limit_reached_at : "",
      crossed: f.thresholds_crossed ? f.thresholds_crossed.map((t) => percent(t)).join(", ") : "",
      offers: f.upgrade ? (f.upgrade.plan ? `plan ${f.upgrade.plan}` : "the upgrade link") : "",
      link: f.upgrade ? f.upgrade.subscription_url : "",
    })),
    ["feature", "used", "limit", "remaining", "share", "crossed", "reached", "offers", "link"],
  );
  $("customer-detail").hidden = false;
}

const percent = (share) => (share === null || share === undefined ? null : `${(share * 100).toFixed(1)}%`);

async function activation() {
  const { current, history } = JSON.parse(await api("/v1/activation"));
  if (current && current.times) {
    setText("threshold", `At least ${current.times} × ${current.event} within ${current.days} days (phi ${current.phi === null ? "–" : current.phi.toFixed(3)})`);
  } else {
    setText("threshold", current ? `No threshold chosen in version ${current.version}` : "No version computed yet");
  }
  setText("cohort", current ? current.cohort : null);
  setText("retention-above", current ? percent(current.retention_above) : null);
  setText("retention-below", current ? percent(current.retention_below) : null);
  setText("as-of", current ? current.as_of : null);
  if (current) {
    // The picture needs the key: fetched, then shown from memory (an <img> cannot send it).
    const answer = await fetch(current.picture_url, { headers: { authorization: `Bearer ${key()}` } });
    if (answer.ok) {
      const picture = $("picture");
      if (picture.src.startsWith("blob:")) URL.revokeObjectURL(picture.src);
      picture.src = URL.createObjectURL(await answer.blob());
      $("picture-frame").hidden = false;
    }
  }
  fillTable(
    "versions",
    history.map((v) => ({ ...v, threshold: v.times ? `${v.times} × in ${v.days} d` : "", phi: v.phi === null ? "" : v.phi.toFixed(3) })),
    ["version", "computed_at", "threshold", "phi", "reason"],
  );
  const series = JSON.parse(await api("/v1/northstar")).series || [];
  drawBars("northstar-chart", series.map((point) => [point.day, point.activated]));
  await experiments();
}

// The latest experiments with each arm's shares and the retention difference.
async function experiments() {
  const { experiments: all } = JSON.parse(await api("/v1/activation/experiments"));
  const latest = all.slice(-10).reverse();
  const reports = await Promise.all(
    latest.map(async (e) => JSON.parse(await api(`/v1/activation/experiments/${encodeURIComponent(e.id)}`))),
  );
  const both = (arms, measure) =>
    `${percent(arms.treatment[measure].share) || "–"} / ${percent(arms.control[measure].share) || "–"}`;
  const interval = (d) =>
    d ? `${(d.treatment_minus_control * 100).toFixed(1)} pts [${(d.ci95[0] * 100).toFixed(1)}, ${(d.ci95[1] * 100).toFixed(1)}]` : "not judged yet";
  fillTable(
    "experiments",
    reports.map(({ experiment: e, arms, difference }) => ({
      experiment: `${e.id} (${e.flag})${e.ended_at ? " stopped" : ""}`,
      threshold: `${e.times} × ${e.event} in ${e.days} d`,
      started: e.started_at,
      people: `${arms.treatment.people} / ${arms.control.people}`,
      reached: both(arms, "reached"),
      retained: both(arms, "retained"),
      difference: interval(difference.retained),
      upgraded: both(arms, "upgraded"),
    })),
    ["experiment", "threshold", "started", "people", "reached", "retained", "difference", "upgraded"],
  );
}

// A bar per [label, value], drawn with the DOM (no markup strings).
function drawBars(id, points) {
  const svg = $(id);
  svg.replaceChildren();
  const most = Math.max(1, ...points.map(([, value]) => value));
  const width = 600 / Math.max(1, points.length);
  points.forEach(([label, value], i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = (value / most) * 150;
    bar.setAttribute("x", String(i * width + 1));
    bar.setAttribute("y", String(160 - height));
    bar.setAttribute("width", String(Math.max(1, width - 2)));
    bar.setAttribute("height", String(height));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${label}: ${value}`;
    bar.append(title);
    svg.append(bar);
  });
  svg.dataset.bars = String(points.length);
}

async function recompute() {
  setText("recompute-result", "computing…");
  try {
    const answer = JSON.parse(await api("/v1/activation/recompute", {}));
    await activation();
    setText("recompute-result", answer.chosen ? "a new version was chosen" : `no threshold chosen: ${answer.reason}`);
  } catch (error) {
    setText("recompute-result", error.message);
  }
}

const seconds = (s) => (s === null || s === undefined ? "" : s < 3600 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);

async function funnel() {
  const form = Object.fromEntries(new FormData($("funnel-form")).entries());
  const steps = form.steps.split(",").map((step) => step.trim()).filter(Boolean);
  const answer = JSON.parse(await api("/v1/insights/funnel", { steps, window: form.window }));
  const whole = answer.groups[0] ? answer.groups[0].steps : [];
  drawBars("funnel-chart", whole.map((step) => [step.event, step.people]));
  fillTable(
    "funnel",
    whole.map((step) => ({
      event: step.event,
      people: step.people,
      previous: percent(step.conversion_from_previous) || "",
      first: percent(step.conversion_from_first) || "",
      median: seconds(step.median_seconds_to_convert),
    })),
    ["event", "people", "previous", "first", "median"],
  );
}

async function retention() {
  const form = Object.fromEntries(new FormData($("retention-form")).entries());
  const answer = JSON.parse(await api("/v1/insights/retention", { ...form, periods: 8 }));
  fillTable(
    "retention",
    answer.cohorts.map((row) => ({
      cohort: row.cohort.slice(0, 10),
      people: row.people,
      returned: row.returned.map((n) => (row.people ? `${Math.round((100 * n) / row.people)}%` : "–")).join("  "),
    })),
    ["cohort", "people", "returned"],
  );
}

async function insights() {
  await funnel();
  await retention();
}

async function schema() {
  const week = `now() - INTERVAL '7 days'`;
  const [events, violations, rejected] = await Promise.all([
    sql(
      `SELECT coalesce(event, type) AS event, coalesce(schema_version, '') AS version, count(*) AS stored, sum(CASE WHEN context LIKE '%"schema_violations"%' THEN 1 ELSE 0 END) AS tagged FROM events WHERE "timestamp" >= ${week} GROUP BY 1, 2 ORDER BY stored DESC, event LIMIT 100`,
    ),
    sql(
      `SELECT json_get_json(context, 'schema_violations') AS violations, count(*) AS n FROM events WHERE "timestamp" >= ${week} AND context LIKE '%"schema_violations"%' GROUP BY 1 ORDER BY n DESC LIMIT 20`,
    ),
    sql(
      `SELECT coalesce(json_get_str(payload, 'event'), json_get_str(payload, 'type'), '(none)') AS event, reasons, count(*) AS n FROM rejected_events WHERE received_at >= ${week} GROUP BY 1, 2 ORDER BY n DESC LIMIT 50`,
    ),
  ]);
  fillTable("schema-events", events, ["event", "version", "stored", "tagged"]);
  fillTable("schema-violations", violations, ["violations", "n"]);
  fillTable("schema-rejected", rejected, ["event", "reasons", "n"]);
}

const views = {
  overview: () => overview(),
  events: () => latest({}),
  customers: (params) => customers(params.get("customer")),
  activation: () => activation(),
  insights: () => insights(),
  schema: () => schema(),
};

async function show() {
  // `#view`, or `#view&name=value…` (a customer chosen in the customers view).
  const [name, ...rest] = location.hash.slice(1).split("&");
  const view = name in views ? name : "overview";
  const params = new URLSearchParams(rest.join("&"));
  for (const name of ["login", ...Object.keys(views)]) $(name).hidden = true;
  if (!key()) {
    $("login").hidden = false;
    $("forget").hidden = true;
    return;
  }
  $("forget").hidden = false;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === view);
  }
  $(view).hidden = false;
  showError(null);
  try {
    await views[view](params);
    document.body.dataset.loaded = view;
  } catch (error) {
    showError(error);
    if (!key()) show();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromAddress();
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    show();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    show();
  });
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    latest(Object.fromEntries(form.entries())).catch(showError);
  });
  $("recompute").addEventListener("click", () => recompute());
  $("billing-retry").addEventListener("click", () => retryDead());
  for (const [form, run] of [["funnel-form", funnel], ["retention-form", retention]]) {
    $(form).addEventListener("submit", (event) => {
      event.preventDefault();
      run().catch(showError);
    });
  }
  window.addEventListener("hashchange", show);
  show();
});
