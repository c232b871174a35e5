// Talking to the server: JSON requests, uploads, and the websocket with automatic reconnection.

function newClientId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replaceAll("-", "");
  return Array.from({ length: 32 }, () => Math.floor(Math.random() * 16).toString(16)).join("");
}

export const clientId = sessionStorage.getItem("loom.clientId") || newClientId();
sessionStorage.setItem("loom.clientId", clientId);

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// The answer's JSON and its headers; `api` below when only the JSON matters.
export async function request(path, { method = "GET", body, form } = {}) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (form) {
    options.body = form;
  } else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, headers: response.headers };
}

export async function api(path, options) {
  return (await request(path, options)).data;
}

export function viewUrl(image) {
  const query = new URLSearchParams({
    filename: image.filename,
    subfolder: image.subfolder || "",
    type: image.type || "output",
  });
  return `/view?${query}`;
}

// folder: "input" (LoadImage's), or "output"/"temp" for nodes that read those (LoadImageOutput).
export async function uploadImage(file, folder = "input") {
  const form = new FormData();
  form.append("image", file, file.name);
  if (folder !== "input") form.append("type", folder);
  return api("/upload/image", { method: "POST", form });
}

// handlers: {open(), close(), message(type, data), preview(blob)}
export function connect(handlers) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let retry = 500;
  function open() {
    const ws = new WebSocket(`${scheme}://${location.host}/ws?clientId=${clientId}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      retry = 500;
      handlers.open && handlers.open();
    };
    ws.onclose = () => {
      handlers.close && handlers.close();
      setTimeout(open, retry);
      retry = Math.min(retry * 2, 10000);
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        const message = JSON.parse(event.data);
        handlers.message(message.type, message.data);
        return;
      }
      const view = new DataView(event.data);
      if (view.getUint32(0) !== 1) return; // 1 = preview image
      const mime = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
      handlers.preview(new Blob([event.data.slice(8)], { type: mime }));
    };
  }
  open();
}
