// A minimal inbox on the pgnotify-worker inbox API (docs/inbox.md): fetch for the list, the
// counts and the marks; EventSource for live updates. Open it as
//   index.html#api=https://notify.example.com&token=<user token from your backend>
// (a real app asks its backend for the token, and for a new one when the stream says `expired`).
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const api = (params.get("api") || "").replace(/\/$/, "");
const token = params.get("token") || "";
const byId = new Map(); // inbox id -> message
const list = document.getElementById("messages");
const unread = document.getElementById("unread");
const state = document.getElementById("state");

function call(path, body) {
  const init = { headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return fetch(api + path, init).then(async (r) => {
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error || r.statusText);
    return answer;
  });
}

function showCounts(counts) {
  unread.textContent = String(counts.unread);
}

function render() {
  const rows = [...byId.values()].filter((m) => !m.archived_at).sort((a, b) => b.id - a.id);
  list.replaceChildren(...rows.map((m) => {
    const li = document.createElement("li");
    li.dataset.id = m.id;
    li.className = m.read_at ? "read" : "unread";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = m.title || "(no title)"; // textContent: message text is never HTML
    const body = document.createElement("span");
    body.className = "body";
    body.textContent = m.body || "";
    li.append(title, body);
    if (!m.read_at) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "mark-read";
      button.textContent = "Mark read";
      button.onclick = () => mark("read", { ids: [m.id] });
      li.append(button);
    }
    return li;
  }));
}

async function mark(action, body) {
  const answer = await call(`/inbox/messages/${action}`, body);
  showCounts(answer.counts);
  await load(); // row states (the stream sends counts; rows come on the next page load)
}

async function load() {
  const page = await call("/inbox/messages?limit=50");
  byId.clear();
  for (const m of page.messages) byId.set(m.id, m);
  render();
  showCounts(await call("/inbox/counts"));
}

function listen() {
  const stream = new EventSource(`${api}/inbox/stream?token=${encodeURIComponent(token)}`);
  stream.onopen = () => { state.textContent = "live"; };
  stream.onerror = () => {
    if (stream.readyState === EventSource.CLOSED) { // refused (429 at the server's cap, 503)
      state.textContent = "offline: retrying in 10 s";
      setTimeout(listen, 10000);
    } else {
      state.textContent = "reconnecting…"; // the browser retries on its own
    }
  };
  stream.addEventListener("message", (e) => { // a new or changed message
    const m = JSON.parse(e.data);
    byId.set(m.id, m);
    render();
  });
  stream.addEventListener("counts", (e) => showCounts(JSON.parse(e.data)));
  stream.addEventListener("reset", () => load());
  stream.addEventListener("expired", () => {
    stream.close(); // a real app fetches a new token here and listens again
    state.textContent = "session expired";
  });
}

document.getElementById("read-all").onclick = () => mark("read", { all: true });
load().then(listen, (err) => { state.textContent = `error: ${err.message}`; });
