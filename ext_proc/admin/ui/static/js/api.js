// The admin API, called with the token the person signed in with.
//
// The token lives in sessionStorage: it survives a reload of this tab and goes away with
// it. Every call sends it as `Authorization: Bearer`; the console's own files need none.

const TOKEN_KEY = "gateway-console:token";
const WHO_KEY = "gateway-console:who";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the admin API answered ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
    this.errors = Array.isArray(error.errors) ? error.errors : [];
    this.usedBy = error.used_by || null;
  }
}

const listeners = { unauthorized: [] };

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  get who() {
    try {
      return JSON.parse(sessionStorage.getItem(WHO_KEY) || "null");
    } catch {
      return null;
    }
  },
  get canWrite() {
    const who = this.who;
    return Boolean(who && who.role === "admin");
  },
  save(token, who) {
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(WHO_KEY, JSON.stringify(who));
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(WHO_KEY);
  },
  /** Called when the API refuses the token (revoked, expired) in the middle of a session. */
  onUnauthorized(callback) {
    listeners.unauthorized.push(callback);
  },
};

function url(path, query) {
  const target = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    // An empty string is sent (`by=`: grand totals); null and undefined are left out.
    if (value !== undefined && value !== null) target.searchParams.set(name, String(value));
  }
  return target;
}

function headers(token, json) {
  const out = { authorization: `Bearer ${token}`, accept: "application/json" };
  if (json) out["content-type"] = "application/json";
  return out;
}

/** One API call: the parsed JSON answer, or an ApiError with the gateway's error fields. */
export async function call(method, path, { body, query, signal, token } = {}) {
  const bearer = token || session.token;
  const response = await fetch(url(path, query), {
    method,
    headers: headers(bearer, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && !token) for (const callback of listeners.unauthorized) callback(error);
    throw error;
  }
  return data;
}

export const get = (path, query, options = {}) => call("GET", path, { ...options, query });
export const post = (path, body, options = {}) => call("POST", path, { ...options, body });
export const patch = (path, body, options = {}) => call("PATCH", path, { ...options, body });
export const del = (path, options = {}) => call("DELETE", path, options);

/** Path segments from names (a model name may hold a slash or a dot). */
export function p(strings, ...names) {
  return strings.reduce((out, part, i) => out + part + (i < names.length ? encodeURIComponent(names[i]) : ""), "");
}

/**
 * Server-sent events read with fetch(), so the request can carry the Authorization
 * header (EventSource cannot). Yields {event, data, id} for every event; comments
 * (keep-alives) are skipped. `onOpen` runs once the server has answered (subscribed).
 * Ends when the server closes the stream; `signal` aborts.
 */
export async function* events(path, query, signal, { onOpen } = {}) {
  const response = await fetch(url(path, query), {
    headers: { ...headers(session.token, false), accept: "text/event-stream" },
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) {
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    const error = new ApiError(response.status, data);
    if (response.status === 401) for (const callback of listeners.unauthorized) callback(error);
    throw error;
  }
  if (onOpen) onOpen(); // subscribed: what finishes from now on arrives here
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = { event: "message", data: "", id: null };
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (name === "event") message.event = text;
          else if (name === "data") data.push(text);
          else if (name === "id") message.id = text;
        }
        if (data.length) {
          message.data = data.join("\n");
          yield message;
        }
      }
    }
  } finally {
    // Closes the connection when the reader stops early (a filter changed, the view left).
    reader.cancel().catch(() => {});
  }
}
